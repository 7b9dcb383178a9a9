# Stage 4: rank every benchmark's gallery with every method and score it as the official code does.


rule evaluate:
    input:
        unpack(get_eval_inputs),
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
    threads: workflow.cores
    conda:
        "../../environment.yml"
    script:
        "../scripts/evaluate.py"
