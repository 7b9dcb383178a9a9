# Real data: locate (download and verify, or find under data_root) -> ground truth -> embed.
# Table 3's re-rankers that read more than embeddings: DINOv2 local descriptors of ILIAS image
# queries and of the database images in some query's top-k (chamfer, spatial_verification), and
# INQUIRE-Rerank's candidate images as files (the VLM re-rankers).
# Raw files live under real.data_root; manifests of the local files under results/data/; the
# embedding cache under results/embeddings/{dataset}/{backbone}/{split}.


rule locate_data:
    output:
        "results/data/{source}.json",
    log:
        "results/logs/data/locate/{source}.log",
    params:
        real=config["real"],
        dataset=lambda wildcards: wildcards.source,
    wildcard_constraints:
        source="|".join(REAL_SOURCES),
    conda:
        "../../environment.yml"
    script:
        "../scripts/locate_data.py"


rule ilias_ground_truth:
    input:
        files="results/data/ilias_core.json",
    output:
        positives="results/groundtruth/ilias.json",
    log:
        "results/logs/data/ground_truth/ilias.log",
    params:
        benchmark="ilias",
    conda:
        "../../environment.yml"
    script:
        "../scripts/prepare_ground_truth.py"


rule inquire_ground_truth:
    input:
        files="results/data/inquire.json",
    output:
        positives="results/groundtruth/inquire.json",
    log:
        "results/logs/data/ground_truth/inquire.log",
    params:
        benchmark="inquire",
    conda:
        "../../environment.yml"
    script:
        "../scripts/prepare_ground_truth.py"


rule inquire_rerank_ground_truth:
    input:
        files="results/data/inquire_rerank.json",
    output:
        positives="results/groundtruth/inquire_rerank.json",
        candidates="results/groundtruth/inquire_rerank_candidates.json",
    log:
        "results/logs/data/ground_truth/inquire_rerank.log",
    params:
        benchmark="inquire_rerank",
    conda:
        "../../environment.yml"
    script:
        "../scripts/prepare_ground_truth.py"


rule embed_ilias_image_queries:
    input:
        files="results/data/ilias_core.json",
    output:
        directory("results/embeddings/ilias/{backbone}/image_queries"),
    log:
        "results/logs/embed/ilias/{backbone}/image_queries.log",
    params:
        job="ilias_image_queries",
        real=config["real"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_ilias_text_queries:
    input:
        files="results/data/ilias_core.json",
    output:
        directory("results/embeddings/ilias/{backbone}/text_queries"),
    log:
        "results/logs/embed/ilias/{backbone}/text_queries.log",
    params:
        job="ilias_text_queries",
        real=config["real"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_ilias_gallery:
    input:
        files="results/data/ilias_core.json",
        distractors="results/data/ilias_yfcc.json",
    output:
        directory("results/embeddings/ilias/{backbone}/gallery"),
    log:
        "results/logs/embed/ilias/{backbone}/gallery.log",
    params:
        job="ilias_gallery",
        real=config["real"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_ilias_mini_gallery:
    input:
        files="results/data/ilias_core.json",
        distractors="results/data/ilias_mini.json",
    output:
        directory("results/embeddings/ilias_mini/{backbone}/gallery"),
    log:
        "results/logs/embed/ilias_mini/{backbone}/gallery.log",
    params:
        job="ilias_mini_gallery",
        real=config["real"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_inquire_text_queries:
    input:
        files="results/data/inquire.json",
    output:
        directory("results/embeddings/inquire/{backbone}/text_queries"),
    log:
        "results/logs/embed/inquire/{backbone}/text_queries.log",
    params:
        job="inquire_text_queries",
        real=config["real"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_inquire_gallery:
    input:
        files="results/data/inquire.json",
    output:
        directory("results/embeddings/inquire/{backbone}/gallery"),
    log:
        "results/logs/embed/inquire/{backbone}/gallery.log",
    params:
        job="inquire_gallery",
        real=config["real"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_inquire_rerank_text_queries:
    input:
        files="results/data/inquire_rerank.json",
    output:
        directory("results/embeddings/inquire_rerank/{backbone}/text_queries"),
    log:
        "results/logs/embed/inquire_rerank/{backbone}/text_queries.log",
    params:
        job="inquire_rerank_text_queries",
        real=config["real"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_inquire_rerank_gallery:
    input:
        files="results/data/inquire_rerank.json",
        images="results/data/inquire_rerank_images",  # extracted once, shared with the VLMs
    output:
        directory("results/embeddings/inquire_rerank/{backbone}/gallery"),
    log:
        "results/logs/embed/inquire_rerank/{backbone}/gallery.log",
    params:
        job="inquire_rerank_gallery",
        real=config["real"],
        device=config["device"],
        images_dir=lambda wildcards, input: input.images,
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule embed_training_set:
    input:
        files=get_training_set_files,
    output:
        train=directory("results/embeddings/{trainset}/{backbone}/train"),
        valid=directory("results/embeddings/{trainset}/{backbone}/valid"),
    log:
        "results/logs/embed/{trainset}/{backbone}/training_set.log",
    params:
        job="training_set",
        real=config["real"],
        device=config["device"],
        collections=lambda wildcards: config["real"]["training_sets"][wildcards.trainset],
    wildcard_constraints:
        trainset="|".join(map(re.escape, config["real"]["training_sets"])),
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/embed_real.py"


rule extract_inquire_rerank_images:
    input:
        files="results/data/inquire_rerank.json",
    output:
        images=directory("results/data/inquire_rerank_images"),
        images_tsv="results/data/inquire_rerank_images.tsv",
        query_texts="results/data/inquire_rerank_queries.tsv",
    log:
        "results/logs/data/extract_inquire_rerank_images.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract_inquire_rerank_images.py"


rule ilias_shortlist_ids:
    input:
        gallery="results/embeddings/ilias/{backbone}/gallery",
        image_queries="results/embeddings/ilias/{backbone}/image_queries",
    output:
        "results/local_descriptors/ilias/{backbone}/shortlist_ids.txt",
    log:
        "results/logs/local_descriptors/ilias/{backbone}/shortlist_ids.log",
    params:
        shortlist=config["evaluation"]["ilias"]["rerank_shortlist"],
        margin=config["real"]["local_descriptors"]["shortlist_margin"],
        chunk_rows=config["evaluation"]["chunk_rows"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/ilias_shortlist_ids.py"


rule extract_ilias_query_local_descriptors:
    input:
        files="results/data/ilias_core.json",
    output:
        descriptors="results/local_descriptors/ilias/queries.npz",
        meta="results/local_descriptors/ilias/queries.npz.json",
        skipped="results/local_descriptors/ilias/queries.npz.skipped.tsv",
    log:
        "results/logs/local_descriptors/ilias/queries.log",
    params:
        job="queries",
        options=config["real"]["local_descriptors"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract_local_descriptors.py"


rule extract_ilias_database_local_descriptors:
    input:
        files="results/data/ilias_core.json",
        distractors="results/data/ilias_yfcc.json",
        ids="results/local_descriptors/ilias/{backbone}/shortlist_ids.txt",
    output:
        descriptors="results/local_descriptors/ilias/{backbone}/database.npz",
        meta="results/local_descriptors/ilias/{backbone}/database.npz.json",
        skipped="results/local_descriptors/ilias/{backbone}/database.npz.skipped.tsv",
    log:
        "results/logs/local_descriptors/ilias/{backbone}/database.log",
    params:
        job="database",
        options=config["real"]["local_descriptors"],
        device=config["device"],
    threads: 2
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract_local_descriptors.py"
