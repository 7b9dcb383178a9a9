# Stage 5: the paper's tables, ours beside the paper's numbers, and results/report.md gathering
# them with the figures. table1.csv also waits for the figures so that asking for it builds every
# artefact of the paper.


rule tables:
    input:
        evaluations=all_evaluations(),
        paper=PAPER_NUMBERS,
        figures=["figures/fig3_tsne.png", "figures/fig4_cost_accuracy.png"],
    output:
        table1="results/table1.csv",
        table1_md="results/table1.md",
        table2="results/table2.csv",
        table2_md="results/table2.md",
        table3="results/table3.csv",
        table3_md="results/table3.md",
        table4="results/table4.csv",
        table4_md="results/table4.md",
        report="results/report.md",
    log:
        "results/logs/tables.log",
    params:
        run_id=config["run_id"],
        config=config,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/make_tables.py"
