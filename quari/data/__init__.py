"""Real data: the official files of ILIAS, INQUIRE and the training collections, turned into what
the harness consumes.

Every adapter reads the benchmark's own published format and produces

- item lists ``[(official_id, image source)]`` for :func:`quari.embedding_cache.embed_images` and
  ``[(id, text)]`` for :func:`quari.embedding_cache.embed_texts`;
- ground truth ``{query_id: [positive ids]}`` for :func:`quari.store.save_positives`;
- training pairs (images, captions, labels) for :class:`quari.store.TrainingCollection`.

Modules: ``downloads`` (resumable, verified, atomic fetching; Hugging Face files; a `data_root`
of files a user already has), ``tars`` (webdataset tar shards read by member offset),
``ilias``, ``inquire``, ``collections`` (MS-COCO, CC12M, BioTrove-style tables, UnED).
"""

from quari.data.tars import ImageRef, read_tar_samples

__all__ = ["ImageRef", "read_tar_samples"]
