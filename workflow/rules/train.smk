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
    threads: workflow.cores
    conda:
        "../../environment.yml"
    script:
        "../scripts/train_method.py"
