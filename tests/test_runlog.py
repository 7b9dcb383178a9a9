"""A stage's log file: log records and progress bars as lines a person can read."""

import logging
import sys

import pytest
from tqdm import tqdm

from quari import runlog
from quari.runlog import log_to


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(runlog.time, "monotonic", fake.monotonic)
    return fake


def test_progress_bar_becomes_spaced_lines_in_the_log(tmp_path, clock, capsys):
    path = tmp_path / "stage.log"
    with log_to(path):
        logging.getLogger("quari.test").info("starting")
        for step in tqdm(range(100), desc="training", mininterval=0, file=sys.stderr):
            clock.now = step * 0.5  # 50 s in all: a line every 5 s in the file, 30 s on screen
            if step == 50:
                logging.getLogger("quari.test").info("halfway")
    text = path.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    bars = [line for line in lines if line.startswith("training:")]
    # every 5 s of the 50 (steps 0, 10, ..., 90), plus the final state
    assert 9 <= len(bars) <= 12, bars
    assert "100/100" in bars[-1]
    assert sum("100/100" in b for b in bars) == 1
    # log records keep their own lines, between the bars
    assert any(line.endswith("INFO starting") for line in lines)
    halfway = next(i for i, line in enumerate(lines) if line.endswith("INFO halfway"))
    assert 0 < halfway < len(lines) - 1
    # the terminal gets fewer bar lines, named by the log file
    screen = [line for line in capsys.readouterr().err.splitlines() if "training:" in line]
    assert 2 <= len(screen) <= 4, screen
    assert all(line.startswith(f"[{path}] training:") for line in screen)


def test_failure_is_logged_with_what_to_do(tmp_path):
    path = tmp_path / "stage.log"
    with pytest.raises(RuntimeError):
        with log_to(path):
            raise RuntimeError("bad input file x")
    text = path.read_text()
    assert "bad input file x" in text
    assert "run the same command again" in text
