# Stage 3: fit every method (QuARI, its ablations and the baselines) on the training collection.


rule train_method:
    input:
        unpack(get_train_inputs),
    output:
        "results/models/{method}/{backbone}/method.json",
    log:
        "results/logs/train/{method}/{backbone}.log",
    params:
        method_type=lambda wildcards: method_type(wildcards.method),
        method_params=lambda wildcards: method_params(wildcards.method),
        quari=config["quari"],
        device=config["device"],
    # Synthetic-world models are small: one thread each is nearly as fast as several, so they
    # train side by side; real-data training takes every core given (its work is on the GPU).
    threads: workflow.cores if config["data"] == "real" else 1
    conda:
        "../../environment.yml"
    script:
        "../scripts/train_method.py"
