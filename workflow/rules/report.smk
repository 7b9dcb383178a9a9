# Stage 7: the pages of Snakemake's own HTML report. After a run,
#   snakemake --report results/report.html
# writes one self-contained page with every table and figure (each with its caption from
# workflow/report/), this run's configuration, the job graph and the run time of every job.


rule report_pages:
    input:
        **{f"table{n}": f"results/table{n}.md" for n in (1, 2, 3, 4)},
    output:
        **{f"table{n}": report(f"results/report/table{n}.html", caption=f"../report/table{n}.rst",
                               category="Tables", labels={"table": f"Table {n}"})
           for n in (1, 2, 3, 4)},
        configuration=report("results/report/configuration.yaml",
                             caption="../report/configuration.rst", category="Configuration",
                             labels={"file": "configuration"}),
    log:
        "results/logs/report_pages.log",
    params:
        config=config,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/report_pages.py"
