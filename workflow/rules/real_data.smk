# Real data: locate (download and verify, or find under data_root) -> ground truth -> embed.
# Table 3's re-rankers that read more than embeddings: DINOv2 local descriptors of ILIAS image
# queries and of the database images in some query's top-k (the local-feature re-rankers), and
# INQUIRE-Rerank's candidate images as files (the VLM re-rankers).
# Raw files live under real.data_root; manifests of the local files under results/data/; the
# embedding cache under results/embeddings/{dataset}/{backbone}/{split}. The large sets are
# embedded in parts, one job each, and assembled by a cheap job (docs/cluster.md): galleries
# (gallery-parts/), training sets (training-parts/{collection}/) and Table 3a's database local
# descriptors (database-parts/).


rule locate_data:
    output:
        "results/data/{source}.json",
    log:
        "results/logs/data/locate/{source}.log",
    params:
        data_root=REAL["data_root"],
        download=REAL["download"],
        settings=lambda wildcards: source_settings(wildcards.source),
        dataset=lambda wildcards: wildcards.source,
    wildcard_constraints:
        source="|".join(REAL_SOURCES),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=2880,
    conda:
        "../envs/quari.yaml"
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
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/quari.yaml"
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
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/quari.yaml"
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
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/quari.yaml"
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
        embedding=REAL["embedding"],
        models=lambda wildcards: model_entry(wildcards.backbone),
        device=config["device"],
    threads: 8
    resources:
        mem_mb=32000,
        runtime=120,
        gpu=1,
    conda:
        "../envs/quari.yaml"
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
        embedding=REAL["embedding"],
        models=lambda wildcards: model_entry(wildcards.backbone),
        device=config["device"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=1,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/embed_real.py"


rule locate_data_group:
    input:
        listing="results/data/{source}.json",
    output:
        "results/data/{source}/group-{group}.json",
    log:
        "results/logs/data/locate/{source}/group-{group}.log",
    params:
        data_root=REAL["data_root"],
        download=REAL["download"],
        settings=lambda wildcards: source_settings(wildcards.source),
        dataset=lambda wildcards: wildcards.source,
        group=lambda wildcards: int(wildcards.group),
        # ILIAS: groups of a fixed size among a planned number of shards; a webdataset
        # collection: settings["groups"] equal groups of however many shards it lists
        group_size=lambda wildcards: FAN_OUT.get(f"{wildcards.source}_shards_per_job"),
        planned=lambda wildcards: {"ilias_yfcc": ILIAS_YFCC_SHARDS,
                                   "ilias_mini": REAL["ilias"]["mini_shards"]}.get(wildcards.source),
    wildcard_constraints:
        source="|".join(["ilias_yfcc", "ilias_mini", *map(re.escape, WEBDATASET_GROUPS)]),
        group=r"\d+",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=1440,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/locate_data.py"


rule embed_gallery_part:
    input:
        unpack(gallery_part_input),
    output:
        directory("results/embeddings/{dataset}/{backbone}/gallery-parts/{part}"),
    log:
        "results/logs/embed/{dataset}/{backbone}/gallery-parts/{part}.log",
    params:
        job="gallery_part",
        embedding=REAL["embedding"],
        models=lambda wildcards: model_entry(wildcards.backbone),
        device=config["device"],
        part=gallery_part_settings,
    wildcard_constraints:
        dataset="ilias|ilias_mini|inquire",
        part=r"core|yfcc-\d+|mini-\d+|pool-\d+",
    threads: 8
    resources:
        mem_mb=32000,
        runtime=480,
        gpu=1,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/embed_real.py"


rule assemble_gallery:
    input:
        parts=lambda wildcards: gallery_part_dirs(wildcards.dataset, wildcards.backbone),
    output:
        directory("results/embeddings/{dataset}/{backbone}/gallery"),
    log:
        "results/logs/embed/{dataset}/{backbone}/gallery.log",
    wildcard_constraints:
        dataset="ilias|ilias_mini|inquire",
    threads: 1
    resources:
        mem_mb=8000,  # 64-bit digests of 100M ids, sorted, to check they are distinct
        runtime=120,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/assemble_gallery.py"


ruleorder: embed_inquire_gallery > assemble_gallery


rule embed_inquire_text_queries:
    input:
        files="results/data/inquire.json",
    output:
        directory("results/embeddings/inquire/{backbone}/text_queries"),
    log:
        "results/logs/embed/inquire/{backbone}/text_queries.log",
    params:
        job="inquire_text_queries",
        embedding=REAL["embedding"],
        models=lambda wildcards: model_entry(wildcards.backbone),
        device=config["device"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=1,
    conda:
        "../envs/quari.yaml"
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
        job="inquire_precomputed_gallery",
        models=lambda wildcards: model_entry(wildcards.backbone),
    wildcard_constraints:
        backbone=PRECOMPUTED_POOL,  # the others: assemble_gallery over the pool's parts
    threads: 1
    resources:
        mem_mb=16000,
        runtime=240,
    conda:
        "../envs/quari.yaml"
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
        embedding=REAL["embedding"],
        models=lambda wildcards: model_entry(wildcards.backbone),
        device=config["device"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=1,
    conda:
        "../envs/quari.yaml"
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
        embedding=REAL["embedding"],
        models=lambda wildcards: model_entry(wildcards.backbone),
        device=config["device"],
        images_dir=lambda wildcards, input: input.images,
    threads: 8
    resources:
        mem_mb=32000,
        runtime=120,
        gpu=1,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/embed_real.py"


rule embed_training_part:
    input:
        unpack(training_part_input),
    output:
        directory("results/embeddings/{trainset}/{backbone}/training-parts/{collection}/{part}"),
    log:
        "results/logs/embed/{trainset}/{backbone}/training-parts/{collection}/{part}.log",
    params:
        job="training_part",
        embedding=REAL["embedding"],
        models=lambda wildcards: model_entry(wildcards.backbone),
        device=config["device"],
        collection=lambda wildcards: REAL["collections"][wildcards.collection],
        part=training_part_settings,
    wildcard_constraints:
        trainset="|".join(map(re.escape, config["real"]["training_sets"])),
        collection="|".join(map(re.escape, config["real"]["collections"])),
        part=r"\d{4}",
    threads: 8
    resources:
        mem_mb=32000,
        runtime=480,
        gpu=1,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/embed_real.py"


rule assemble_training_set:
    input:
        parts=lambda wildcards: training_part_dirs(wildcards.trainset, wildcards.backbone),
    output:
        train=directory("results/embeddings/{trainset}/{backbone}/train"),
        valid=directory("results/embeddings/{trainset}/{backbone}/valid"),
    log:
        "results/logs/embed/{trainset}/{backbone}/training_set.log",
    wildcard_constraints:
        trainset="|".join(map(re.escape, config["real"]["training_sets"])),
    threads: 1
    resources:
        mem_mb=16000,  # the label of every image (about 12M for the captions set), by name
        runtime=120,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/assemble_training_set.py"


rule extract_inquire_rerank_images:
    input:
        files="results/data/inquire_rerank.json",
    output:
        images=directory("results/data/inquire_rerank_images"),
        images_tsv="results/data/inquire_rerank_images.tsv",
        query_texts="results/data/inquire_rerank_queries.tsv",
    log:
        "results/logs/data/extract_inquire_rerank_images.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/quari.yaml"
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
    threads: 8
    resources:
        mem_mb=32000,
        runtime=720,
    conda:
        "../envs/quari.yaml"
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
        options={k: v for k, v in REAL["local_descriptors"].items()
                 if k not in ("database_descriptors", "shortlist_margin")},
        device=config["device"],
    threads: 8
    resources:
        mem_mb=32000,
        runtime=120,
        gpu=1,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/extract_local_descriptors.py"


rule extract_ilias_database_local_descriptors:
    input:
        files="results/data/ilias_core.json",
        distractors=yfcc_group_manifests,
        ids="results/local_descriptors/ilias/{backbone}/shortlist_ids.txt",
    output:  # one part of the shortlist; removed once assembled (the assembly copies it)
        descriptors=temp("results/local_descriptors/ilias/{backbone}/database-parts/{part}.npz"),
        meta=temp("results/local_descriptors/ilias/{backbone}/database-parts/{part}.npz.json"),
        skipped=temp("results/local_descriptors/ilias/{backbone}/database-parts/{part}.npz.skipped.tsv"),
    log:
        "results/logs/local_descriptors/ilias/{backbone}/database-parts/{part}.log",
    params:
        job="database",
        options={k: v for k, v in REAL["local_descriptors"].items()
                 if k not in ("query_descriptors", "shortlist_margin")},
        device=config["device"],
        part=lambda wildcards: {"part": int(wildcards.part),
                                "of": FAN_OUT["local_descriptor_jobs"]},
    wildcard_constraints:
        part=r"\d{4}",
    threads: 8
    resources:
        mem_mb=32000,
        runtime=720,
        gpu=1,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/extract_local_descriptors.py"


rule assemble_ilias_database_local_descriptors:
    input:
        ids="results/local_descriptors/ilias/{backbone}/shortlist_ids.txt",
        parts=lambda wildcards: [
            f"results/local_descriptors/ilias/{wildcards.backbone}/database-parts/{p:04d}.npz"
            for p in range(FAN_OUT["local_descriptor_jobs"])],
        records=lambda wildcards: [
            f"results/local_descriptors/ilias/{wildcards.backbone}/database-parts/{p:04d}.npz{x}"
            for p in range(FAN_OUT["local_descriptor_jobs"]) for x in (".json", ".skipped.tsv")],
    output:
        descriptors="results/local_descriptors/ilias/{backbone}/database.npz",
        meta="results/local_descriptors/ilias/{backbone}/database.npz.json",
        skipped="results/local_descriptors/ilias/{backbone}/database.npz.skipped.tsv",
    log:
        "results/logs/local_descriptors/ilias/{backbone}/database.log",
    params:
        options={k: v for k, v in REAL["local_descriptors"].items()
                 if k not in ("query_descriptors", "shortlist_margin")},
    threads: 1
    resources:
        mem_mb=8000,  # ids, counts and sizes of the shortlisted images; rows streamed in blocks
        runtime=720,  # a streamed copy of every part (about 185 GB for the paper's shortlists)
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/assemble_local_descriptors.py"
