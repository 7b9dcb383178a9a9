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
        models=get_train_models,
        device=config["device"],
        max_dropped_fraction=config["evaluation"]["max_dropped_fraction"],
    # Synthetic-world models are small: one thread each is nearly as fast as several, so they
    # train side by side; real-data training feeds one GPU.
    threads: 8 if config["data"] == "real" else 1
    # the costliest trainings first (each method's fit_cost), so few cores finish sooner
    priority: lambda wildcards: method_class(wildcards.method).fit_cost if method_trains(wildcards.method) else 0
    # methods with nothing to fit (their class says trainable = False) only write their settings
    resources:
        mem_mb=lambda wildcards: 64000 if method_trains(wildcards.method) else 4000,
        runtime=lambda wildcards: 2880 if method_trains(wildcards.method) else 30,
        gpu=lambda wildcards: int(config["data"] == "real" and method_trains(wildcards.method)),
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/train_method.py"
