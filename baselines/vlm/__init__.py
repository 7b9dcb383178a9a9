"""Table 3b's vision-language-model re-rankers (:mod:`.reranker`) and the yes/no scorer of the
open VLMs they run (:mod:`.scorer`)."""
