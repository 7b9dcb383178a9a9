# Stage 2: semi-positives, the nearest neighbours of every training image in the backbone space.


rule mine_semipositives:
    input:
        train="results/embeddings/{trainset}/{backbone}/train",
    output:
        "results/mining/{trainset}/{backbone}/semipositives.npz",
    log:
        "results/logs/mining/{trainset}/{backbone}.log",
    params:
        mining=config["mining"],
    threads: 8 if config["data"] == "real" else 1
    priority: 20  # short, and every training waits for it
    resources:
        mem_mb=64000,
        runtime=720,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/mine_semipositives.py"
