# Stage 1: the data. The synthetic world is generated from its seed and "embedded" by each
# synthetic backbone; real data (ILIAS, INQUIRE, training collections) is downloaded and embedded.


if config["data"] == "synthetic":

    rule synthetic_ground_truth:
        output:
            ilias="results/groundtruth/ilias.json",
            inquire="results/groundtruth/inquire.json",
        log:
            "results/logs/data/synthetic_ground_truth.log",
        params:
            synthetic=config["synthetic"],
        threads: 1
        priority: 20  # short, and every evaluation waits for it
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../envs/quari.yaml"
        script:
            "../scripts/synthetic_ground_truth.py"

    rule embed_synthetic:
        output:
            train=directory("results/embeddings/synthetic/{backbone}/train"),
            valid=directory("results/embeddings/synthetic/{backbone}/valid"),
            oracle="results/embeddings/synthetic/{backbone}/oracle.npz",
            ilias_gallery=directory("results/embeddings/ilias/{backbone}/gallery"),
            ilias_image_queries=directory("results/embeddings/ilias/{backbone}/image_queries"),
            ilias_text_queries=directory("results/embeddings/ilias/{backbone}/text_queries"),
            inquire_gallery=directory("results/embeddings/inquire/{backbone}/gallery"),
            inquire_text_queries=directory("results/embeddings/inquire/{backbone}/text_queries"),
        log:
            "results/logs/data/embed_synthetic/{backbone}.log",
        params:
            synthetic=config["synthetic"],
        threads: 1
        priority: 20  # short, and every later job waits for it
        resources:
            mem_mb=4000,
            runtime=60,
        conda:
            "../envs/quari.yaml"
        script:
            "../scripts/embed_synthetic.py"


if config["data"] == "real":

    include: "real_data.smk"
