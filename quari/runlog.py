"""Send a stage's logging, warnings and progress bars to its log file (and keep them on stderr)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, data):
        for s in self.streams:
            s.write(data)
            s.flush()
        return len(data)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False


@contextlib.contextmanager
def log_to(path: str | Path | None, level: int = logging.INFO):
    """Within the block, log records and stderr (tqdm progress, warnings) also go to ``path``."""
    # progress bars in a log file: one update every few seconds, not one per step
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    if path is None:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        old_stderr = sys.stderr
        sys.stderr = _Tee(old_stderr, f)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(level)
        # faiss logs each CPU-feature build it tries before the one that loads: not news
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        logging.captureWarnings(True)
        try:
            yield
        except BaseException:
            logging.getLogger("quari").exception("stage failed")
            raise
        finally:
            root.removeHandler(handler)
            sys.stderr = old_stderr
