"""A job API that answers 5xx (a head going down or restarting, a tunnel's proxy): vitlab reports it in one
line as a cluster that stopped answering, and a follower waits for it like for silence. The "head" here is a
plain HTTP server on 127.0.0.1 that passes the SDK's version check and answers 500 to everything else."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray

from vitlab import jobs


class FailingHead(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/api/version":
            body = json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": ""}).encode()
            self.send_response(200)
        else:
            body = b"500 Internal Server Error\n\nServer got itself in trouble"
            self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def head_url(monkeypatch):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingHead)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_500_from_the_job_api_is_one_line_and_waited_for(head_url, monkeypatch):
    client = jobs.Jobs(head_url)
    with pytest.raises(jobs.ClusterUnreachable) as caught:
        client.call("get_job_info", "some-job")
    assert str(caught.value) == (f"the Ray cluster at {head_url} stopped answering (HTTP 500); the job's state is "
                                 "unknown: check it with `vitlab jobs status` when the cluster is back")
    monkeypatch.setattr(jobs, "UNREACHABLE_GRACE_S", 1.0)
    started = time.monotonic()
    with pytest.raises(jobs.ClusterUnreachable):
        jobs.wait_until_done(client, "some-job", poll=0.2)
    assert time.monotonic() - started >= 1.0  # after the grace, not at the first 500
