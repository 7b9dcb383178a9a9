# Stage 5: the paper's tables, ours beside the paper's numbers; then results/report.md gathering
# them with the figures and the configuration. table1.csv also waits for the figures so that
# asking for it builds every table and figure of the paper.

TABLE_NAMES = ("1", "2", "3", "4")


rule tables:
    input:
        evaluations=all_evaluations(),
        paper=PAPER_NUMBERS,
        figures=["figures/fig3_tsne.png", "figures/fig4_cost_accuracy.png"],
    output:
        **{f"table{n}": f"results/table{n}.csv" for n in TABLE_NAMES},
        **{f"table{n}_md": f"results/table{n}.md" for n in TABLE_NAMES},
    log:
        "results/logs/tables.log",
    params:
        run_id=config["run_id"],
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/make_tables.py"


# the report records the configuration the run used: it depends on all of it
rule report_markdown:
    input:
        tables=[f"results/table{n}.md" for n in TABLE_NAMES],
        figures=["figures/fig3_tsne.png", "figures/fig4_cost_accuracy.png"],
        evaluations=all_evaluations(),
    output:
        "results/report.md",
    log:
        "results/logs/report_markdown.log",
    params:
        config=config,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/report_markdown.py"
