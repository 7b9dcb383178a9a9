"""The last stage: the paper's tables (:mod:`.tables`), Figures 3 and 4 (:mod:`.figures`) and
``results/report.md`` (:mod:`.report`), from the evaluation results."""
