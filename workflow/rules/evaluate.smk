# Stage 4: rank every benchmark's gallery with every method and score it as the official code does.


rule evaluate:
    input:
        unpack(get_eval_inputs),
        # INQUIRE-Rerank is also scored against all positives in the pool: its manifest lists the
        # Fullrank query CSVs and annotations that give them
        rerank_files=lambda wildcards: (
            "results/data/inquire_rerank.json" if wildcards.benchmark == "inquire_rerank" else []
        ),
    output:
        "results/eval/{benchmark}/{backbone}/{method}.json",
    log:
        "results/logs/eval/{benchmark}/{backbone}/{method}.log",
    params:
        evaluation=config["evaluation"],
        method_type=lambda wildcards: method_type(wildcards.method),
        data=config["data"],
        run_id=config["run_id"],
        device=config["device"],
    # streaming search: CPU threads feed the GPU (or score, without one); the synthetic galleries
    # are small enough for one thread, so evaluations run beside the trainings
    threads: 4 if config["data"] == "real" else 1
    resources:
        mem_mb=lambda wildcards: method_class(wildcards.method).evaluation_mem_mb,
        runtime=1440,
        gpu=int(config["data"] == "real"),
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/evaluate.py"
