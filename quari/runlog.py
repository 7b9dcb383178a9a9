"""Send a stage's logging, warnings and progress bars to its log file (and keep them on stderr)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path


class _ProgressLines:
    """Writes a stream of progress-bar redraws (tqdm's carriage-return updates) to ``stream`` as
    whole lines, one at most every ``interval`` seconds, plus the bar's state when it ends its
    line; any other text passes through unchanged."""

    def __init__(self, stream, interval: float, prefix: str = ""):
        self.stream, self.interval, self.prefix = stream, interval, prefix
        self._bar = None  # the bar's latest line, not yet written
        self._last = float("-inf")

    def write(self, data: str) -> None:
        if data.startswith("\r"):  # a bar redrawing its line (tqdm writes each redraw whole)
            self._bar = data.strip("\r\n").rstrip()
            if time.monotonic() - self._last >= self.interval:
                self._write_bar()
        elif self._bar is not None and "\n" in data and not data.strip():  # the bar ends its line
            self._write_bar()
        elif data:
            self.stream.write(data)
        self.stream.flush()

    def _write_bar(self) -> None:
        if self._bar:
            self.stream.write(self.prefix + self._bar + "\n")
        self._bar = None
        self._last = time.monotonic()


class _Tee:
    """stderr during a stage: log records and warnings go to the terminal and the log file as
    they come; progress bars go to both as lines a person can follow (several jobs share the
    terminal, so there a bar does not redraw in place): every 5 s in the file, every 30 s on the
    terminal, named by the log file there."""

    def __init__(self, terminal, log_file, name: str = ""):
        self.outputs = (_ProgressLines(terminal, 30.0, prefix=f"[{name}] " if name else ""),
                        _ProgressLines(log_file, 5.0))
        self.streams = (terminal, log_file)

    def write(self, data):
        for out in self.outputs:
            out.write(data)
        return len(data)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False


@contextlib.contextmanager
def log_to(path: str | Path | None, level: int = logging.INFO):
    """Within the block, log records and stderr (tqdm progress, warnings) also go to ``path``."""
    if path is None:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        old_stderr = sys.stderr
        sys.stderr = _Tee(old_stderr, f, name=str(path))
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
            logging.getLogger("quari").exception(
                "stage failed (the traceback above says where). Fix the cause and run the same "
                "command again: finished jobs are kept, only this one and those after it rerun")
            raise
        finally:
            root.removeHandler(handler)
            sys.stderr = old_stderr
