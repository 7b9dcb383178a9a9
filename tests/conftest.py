"""Fixtures shared by several test modules (what they build lives in tests/builders.py)."""

import http.server
import threading

import numpy as np
import pytest
import torch

from tests.builders import PAYLOAD, FileServerHandler


def pytest_runtest_setup(item):
    """A test marked ``gpu`` is skipped, saying why, where no CUDA device is visible."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileServerHandler)
    httpd.files = {"/data.bin": PAYLOAD}
    httpd.mode, httpd.cut_at, httpd.requests = "normal", 300_000, []
    httpd.etags, httpd.if_range, httpd.cut_once, httpd.cut_always = {}, True, True, False
    httpd.ranges = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
