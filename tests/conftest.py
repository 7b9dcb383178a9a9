"""Fixtures shared by several test modules (what they build lives in tests/builders.py)."""

import http.server
import threading

import numpy as np
import pytest

from tests.builders import PAYLOAD, FileServerHandler


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
