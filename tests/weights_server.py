"""A file server on 127.0.0.1 for the weight-download tests: it stands in for GitHub's raw files and releases.

It serves the bytes a test registers under a path, answers 404 for anything else, logs every request,
and can cut the connection half-way through a file (``Content-Length`` promises the whole file).

Fixtures: ``weights_server`` (one server per test process) and ``online_weights`` (per test: the server
emptied, downloads allowed, ``QING_WEIGHTS_DIR`` in ``tmp_path``). Import both into a test module to use them.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

__all__ = ["WeightsServer", "online_weights", "weights_server"]


class WeightsServer:
    """Files by URL path, the request log, and the paths whose transfer is cut short."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def serve(self, path: str, data: bytes, *, cut: bool = False) -> str:
        with self.lock:
            self.files["/" + path.lstrip("/")] = data
            if cut:
                self.cut.add("/" + path.lstrip("/"))
        return self.url(path)

    def reset(self) -> None:
        with self.lock:
            self.files.clear()
            self.cut.clear()
            self.requests.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet: the request log is kept above
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.requests.append(self.path)
                    data = server.files.get(self.path)
                    cut = self.path in server.cut
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if cut else data)
                self.wfile.flush()
                if cut:
                    self.close_connection = True

        return Handler


@pytest.fixture(scope="session")
def weights_server():
    server = WeightsServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def online_weights(weights_server, tmp_path, monkeypatch) -> WeightsServer:
    """Downloads allowed (the suite is offline otherwise), an empty qing weights directory, an empty server."""
    from huggingface_hub import constants

    weights_server.reset()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("QING_OFFLINE", raising=False)
    monkeypatch.delenv("QING_TRUST_PICKLE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(tmp_path / "qing-weights"))
    monkeypatch.setattr("qing.weights.locate.XRV_CACHE_DIR", tmp_path / "xrv-cache")  # not this machine's cache
    return weights_server
