"""Table 3a's local-feature re-rankers and their machinery.

- :mod:`.rerankers`: the shared re-ranker plumbing, Chamfer similarity and spatial verification;
- :mod:`.ames_reranker`: AMES on each shortlisted pair, combined with the global cosine;
- :mod:`.ames_network`: the AMES network and detector, loadable from the published checkpoints;
- :mod:`.descriptors`: DINOv2 local-descriptor extraction (the workflow's extraction jobs);
- :mod:`.matching`: the descriptor files, Chamfer similarity, RANSAC spatial verification;
- :mod:`.memory_bench`: memory of re-ranking from memory-mapped vs in-memory descriptors.
"""
