# Stage 6: Figure 3 (t-SNE of backbone vs QuARI space) and Figure 4 (re-ranking cost vs accuracy).


rule figure_tsne:
    input:
        unpack(get_tsne_inputs),
    output:
        png=report("figures/fig3_tsne.png", caption="../report/fig3_tsne.rst",
                   category="Figures", labels={"figure": "Figure 3"}),
        pdf="figures/fig3_tsne.pdf",
    log:
        "results/logs/figures/fig3_tsne.log",
    params:
        tsne=config["figures"]["tsne"],
        backbone=figure_backbone("tsne"),
        data=config["data"],
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/figure_tsne.py"


rule figure_cost_accuracy:
    input:
        evaluations=cost_accuracy_evaluations(),
        paper=PAPER_NUMBERS,
    output:
        png=report("figures/fig4_cost_accuracy.png", caption="../report/fig4_cost_accuracy.rst",
                   category="Figures", labels={"figure": "Figure 4"}),
        pdf="figures/fig4_cost_accuracy.pdf",
    log:
        "results/logs/figures/fig4_cost_accuracy.log",
    params:
        data=config["data"],
        backbones=cost_accuracy_backbones(),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/quari.yaml"
    script:
        "../scripts/figure_cost_accuracy.py"
