"""QuARI: Query Adaptive Retrieval Improvement.

A library of the method (hypernetwork, low-rank scoring, semi-positive mining, loss, training) and
of the evaluation it is measured with (official ILIAS and INQUIRE metrics). It knows nothing of
Snakemake; the workflow in ``workflow/`` calls it.
"""

__version__ = "0.1.0"
