"""The traffic simulator against a small real HTTP endpoint that answers as a release in canary.

The endpoint assigns each request by its ``X-Request-Key`` with the release's own rule, names the
answering version and role in headers, and records the labels it is sent, so the test sees what
the simulator put on the wire.
"""

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mlplatform.demo.simulate import ROLE_HEADER, simulate, traffic_records, user_key
from mlplatform.serving.release import REQUEST_KEY_HEADER, Release
from mlplatform_tests.support import free_port

RELEASE = Release(champion="1", challenger="2", stage="canary", canary_share=0.3, rollout_id="r")


@dataclasses.dataclass
class Seen:
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # request id -> key
    records: dict[str, dict] = dataclasses.field(default_factory=dict)  # request id -> record
    labels: list[dict] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def canary_endpoint() -> Iterator[tuple[str, Seen]]:
    seen, lock = Seen(), threading.Lock()

    class Endpoint(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the simulator's client expects

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            headers: dict[str, str] = {}
            with lock:
                if self.path == "/predict":
                    request_id = f"req-{len(seen.keys)}"
                    key = self.headers.get(REQUEST_KEY_HEADER) or request_id
                    seen.keys[request_id] = key
                    seen.records[request_id] = body["records"][0]
                    version = RELEASE.answering_version(key)
                    role = "champion" if version == RELEASE.champion else "canary"
                    answer = {"request_id": request_id, "model_version": version}
                    headers = {"X-Model-Version": version, ROLE_HEADER: role}
                else:
                    seen.labels.extend(body["labels"])
                    answer = {"matched": len(body["labels"]), "unknown": []}
            payload = json.dumps(answer).encode()
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_users_name_themselves_and_every_answer_is_labelled():
    with canary_endpoint() as (url, seen):
        report = simulate(
            url, rate=100, duration_s=1.5, seed=4, users=20, label_share=1.0, label_delay_s=0.1
        )
    assert report.ok == report.requests == 150
    assert set(seen.keys.values()) <= {user_key(n) for n in range(20)}
    assert len(set(seen.keys.values())) > 10
    # Each user is answered by one version throughout; both roles answered some.
    assert sum(report.users.values()) == len(set(seen.keys.values()))
    assert report.roles.keys() == {"champion", "canary"}
    assert report.roles["canary"] == sum(
        RELEASE.answering_version(key) == "2" for key in seen.keys.values()
    )
    assert "canary:" in report.summary()
    # The label posted for a request is the true outcome of the record it sent.
    records, labels = traffic_records(150, 0.0, seed=4)
    truth = {json.dumps(r, sort_keys=True): y for r, y in zip(records, labels, strict=True)}
    assert report.labels_sent == report.labels_matched == len(seen.labels) == 150
    for item in seen.labels:
        sent = seen.records[item["request_id"]]
        assert item["index"] == 0
        assert item["label"] == truth[json.dumps(sent, sort_keys=True)]


def test_without_users_no_key_is_sent():
    with canary_endpoint() as (url, seen):
        report = simulate(url, rate=50, duration_s=0.5, seed=1)
    assert report.ok == 25
    assert all(key == request_id for request_id, key in seen.keys.items())
    assert set(report.users.values()) == {0}  # roles counted, no user named


def test_users_must_be_positive():
    with pytest.raises(ValueError, match="users"):
        simulate("http://127.0.0.1:9", rate=1, duration_s=1, users=0)
