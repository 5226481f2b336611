"""API keys: their configuration, every route's answer to every kind of key, and where keys go.

The route matrix runs on the app every replica serves (``build_api``) in process, around a real
champion; one test serves it through the session's Ray Serve, over HTTP, and then reads every
log file of that Ray session for the keys it sent.
"""

import dataclasses
import json
import os
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from mlplatform.cli import _try_it_text
from mlplatform.defs.serving import EndpointInfo
from mlplatform.demo.simulate import simulate
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.resources import RayServe
from mlplatform.serving import cluster
from mlplatform.serving.keys import (
    ApiKeyError,
    ExposedWithoutKeys,
    bearer_headers,
    client_key,
    is_loopback_host,
    key_digests,
    load_api_keys,
    parse_api_keys,
)
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.release import Release
from mlplatform.serving.routes import build_api
from mlplatform.serving.settings import ServingKnobs, ServingSettings
from mlplatform.status import collect_status
from mlplatform_tests.support import deployed, free_port, train_champion

PREDICT_KEY = "predict-only-key-0123456789abcdef"
FEEDBACK_KEY = "feedback-only-key-0123456789abcdef"
BOTH_KEY = "both-scopes-key-0123456789abcdef"
UNKNOWN_KEY = "not-configured-key-0123456789abcdef"
KEYS_TEXT = f"""
# clients of the endpoint
predict:{PREDICT_KEY}
feedback:{FEEDBACK_KEY}   # the labelling service
predict,feedback:{BOTH_KEY}
"""
SECRETS = (PREDICT_KEY, FEEDBACK_KEY, BOTH_KEY, UNKNOWN_KEY)
LIMITS = ServingKnobs(max_records=20, max_body_bytes=64 * 1024)


def _digests() -> dict:
    return key_digests(parse_api_keys(KEYS_TEXT, "test"))


# ---------------------------------------------------------------------------------------------
# Configuration


def test_entries_give_each_key_its_scopes():
    keys = parse_api_keys(KEYS_TEXT, "test")

    assert [sorted(key.scopes) for key in keys] == [
        ["predict"],
        ["feedback"],
        ["feedback", "predict"],
    ]
    assert [key.secret for key in keys] == [PREDICT_KEY, FEEDBACK_KEY, BOTH_KEY]
    # Whitespace separates entries as well as lines do (one environment variable).
    assert parse_api_keys(f"predict:{PREDICT_KEY} feedback:{FEEDBACK_KEY}", "env") == keys[:2]
    assert all(key.secret not in repr(key) for key in keys)
    digests = key_digests(keys)
    assert all(
        len(digest) == 64 and key.secret not in digest
        for digest, key in zip(digests, keys, strict=True)
    )
    assert digests[keys[2].digest] == ("feedback", "predict")
    assert key_digests([]) is None
    assert parse_api_keys("  \n# nothing\n", "empty") == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (PREDICT_KEY, "entry 1 of test has no scope: write it as scope[,scope]:key"),
        (f"predcit:{PREDICT_KEY}", "entry 1 of test has an unknown scope: scopes are"),
        (f"{PREDICT_KEY}:predict", "entry 1 of test has an unknown scope"),
        ("predict:short-key", "entry 1 of test: a key is at least 16 characters"),
        (
            "predict:" + "a" * 20 + "$" + "b" * 10,
            "entry 1 of test: a key is at least 16 characters",
        ),
        (f"predict:{PREDICT_KEY}\nfeedback:{PREDICT_KEY}", "entry 2 of test repeats the key"),
    ],
)
def test_invalid_entries_are_refused_without_quoting_the_key(entry, message):
    with pytest.raises(ApiKeyError) as error:
        parse_api_keys(entry, "test")

    assert str(error.value).startswith(message)
    assert PREDICT_KEY not in str(error.value)
    assert "short-key" not in str(error.value) and "aaaa" not in str(error.value)


def test_keys_come_from_the_environment_and_a_private_key_file(tmp_path):
    key_file = tmp_path / "api_keys"
    environ = {"MLPLATFORM_API_KEYS": f"predict:{PREDICT_KEY}"}
    assert load_api_keys(tmp_path, {}) == []  # no variable, no file: an open endpoint
    assert [key.secret for key in load_api_keys(tmp_path, environ)] == [PREDICT_KEY]

    key_file.write_text(f"feedback:{FEEDBACK_KEY}\n")
    key_file.chmod(0o600)
    assert [key.secret for key in load_api_keys(tmp_path, environ)] == [PREDICT_KEY, FEEDBACK_KEY]
    assert [key.secret for key in load_api_keys(tmp_path, {})] == [FEEDBACK_KEY]

    for mode in (0o640, 0o604, 0o620):
        key_file.chmod(mode)
        with pytest.raises(ApiKeyError) as error:
            load_api_keys(tmp_path, environ)
        assert str(error.value) == (
            f"the API key file {key_file} is accessible to group or others (mode {mode:o}): "
            f"make it private with `chmod 600 {key_file}`"
        )
        assert FEEDBACK_KEY not in str(error.value)

    key_file.chmod(0o600)
    key_file.write_text(f"predict,feedback:{PREDICT_KEY}\n")
    with pytest.raises(ApiKeyError, match="configured both in MLPLATFORM_API_KEYS and in"):
        load_api_keys(tmp_path, environ)


def test_a_client_presents_its_own_key_or_one_with_the_scope(tmp_path):
    configured = {"MLPLATFORM_API_KEYS": f"predict:{PREDICT_KEY} feedback:{FEEDBACK_KEY}"}

    assert client_key("predict", tmp_path, configured) == PREDICT_KEY
    assert client_key("feedback", tmp_path, configured) == FEEDBACK_KEY
    assert client_key("predict", tmp_path, configured | {"MLPLATFORM_API_KEY": BOTH_KEY}) == (
        BOTH_KEY
    )
    assert client_key("predict", tmp_path, {}) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("ray-head", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


def test_serving_beyond_loopback_without_keys_is_refused_before_anything_starts(tmp_path):
    head = cluster.LocalHead(free_port(), tmp_path / "ray")
    settings = ServingSettings(model_uri="models:/mlplatform/1")

    with pytest.raises(ExposedWithoutKeys) as error:
        cluster.deploy(
            settings,
            ray_address=None,
            host="0.0.0.0",
            port=free_port(),
            app_name="exposed",
            local_head=head,
        )

    message = str(error.value)
    assert message.startswith("refusing to serve on 0.0.0.0 without API keys")
    assert "MLPLATFORM_API_KEYS" in message and "$MLPLATFORM_HOME/api_keys" in message
    assert "'predict,feedback:<key>'" in message and "mode 600" in message
    # Nothing was started: no head, no token, no process group recorded.
    assert not (tmp_path / "ray").exists()
    assert not cluster.port_is_open(cluster.LOOPBACK, head.port)


def test_the_platform_resource_checks_its_keys_before_a_deploy(monkeypatch):
    monkeypatch.setenv("MLPLATFORM_SERVE_HOST", "0.0.0.0")
    with pytest.raises(ExposedWithoutKeys, match=r"refusing to serve on 0\.0\.0\.0"):
        RayServe().check_access()

    monkeypatch.setenv("MLPLATFORM_API_KEYS", f"feedback:{FEEDBACK_KEY}")
    with pytest.raises(ApiKeyError, match="no configured API key has the predict scope"):
        RayServe().check_access()

    monkeypatch.setenv("MLPLATFORM_API_KEYS", KEYS_TEXT)
    assert len(RayServe().check_access()) == 3
    monkeypatch.delenv("MLPLATFORM_API_KEYS")
    assert RayServe(host="127.0.0.1").check_access() == []


# ---------------------------------------------------------------------------------------------
# The routes, in process


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    """A champion trained by the real assets, loaded as a replica loads it."""
    platform, _ = train_champion(tmp_path_factory.mktemp("keys-home"), seed=4)
    return load_served_model("models:/mlplatform@champion", platform.tracking_uri)


@pytest.fixture
def keyed(champion: ServedModel, tmp_path: Path) -> TestClient:
    """The routes with the prediction log, accepting the test's keys only."""
    api = build_api(
        champion,
        LIMITS,
        feedback=FeedbackStore(tmp_path / "feedback.sqlite"),
        api_keys=_digests(),
    )
    return TestClient(api, raise_server_exceptions=False)


def _requests(model: ServedModel) -> dict[str, tuple[str, str, dict | None, str]]:
    """Per route: method, path, a valid body, the scope it needs."""
    record = model.card.example_record
    labels = {"labels": [{"request_id": "0" * 32, "index": 0, "label": model.spec.classes[0]}]}
    return {
        "predict": ("POST", "/predict", {"records": [record]}, "predict"),
        "feedback": ("POST", "/feedback", labels, "feedback"),
        "model": ("GET", "/model", None, "predict"),
        "model card": ("GET", "/model/card", None, "predict"),
        "openapi": ("GET", "/openapi.json", None, "predict"),
        "docs": ("GET", "/docs", None, "predict"),
        "redoc": ("GET", "/redoc", None, "predict"),
    }


_KEYS_WITH = {"predict": PREDICT_KEY, "feedback": FEEDBACK_KEY}
_KEYS_WITHOUT = {"predict": FEEDBACK_KEY, "feedback": PREDICT_KEY}
_CASES = {
    "no header": (None, 401, "missing_api_key"),
    "basic scheme": ("Basic dXNlcjpwYXNz", 401, "malformed_authorization"),
    "bearer without key": ("Bearer", 401, "malformed_authorization"),
    "two keys": (f"Bearer {PREDICT_KEY} {FEEDBACK_KEY}", 401, "malformed_authorization"),
    "key without scheme": (PREDICT_KEY, 401, "malformed_authorization"),
    "unknown key": (f"Bearer {UNKNOWN_KEY}", 401, "invalid_api_key"),
    "wrong scope": ("wrong", 403, "insufficient_scope"),
    "right scope": ("right", 200, None),
    "both scopes": (f"Bearer {BOTH_KEY}", 200, None),
    "lower-case scheme": ("right lower", 200, None),
}


def _authorization(case: str, scope: str) -> str | None:
    value = _CASES[case][0]
    if value == "wrong":
        return f"Bearer {_KEYS_WITHOUT[scope]}"
    if value == "right":
        return f"Bearer {_KEYS_WITH[scope]}"
    if value == "right lower":
        return f"bearer {_KEYS_WITH[scope]}"
    return value


def _check_no_secret(response: httpx.Response) -> None:
    shown = response.text + json.dumps(dict(response.headers))
    assert not any(secret in shown for secret in SECRETS)


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize(
    "route", ["predict", "feedback", "model", "model card", "openapi", "docs", "redoc"]
)
def test_every_route_needs_a_key_with_its_scope(keyed, champion, route, case):
    method, path, body, scope = _requests(champion)[route]
    authorization = _authorization(case, scope)
    headers = {"Authorization": authorization} if authorization is not None else {}

    response = keyed.request(method, path, json=body, headers=headers)

    _, status, kind = _CASES[case]
    assert response.status_code == status, response.text
    _check_no_secret(response)
    if status == 200:
        return
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["header", "authorization"] and detail[0]["type"] == kind
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    if status == 403:
        assert detail[0]["msg"] == f"the API key lacks the `{scope}` scope this route needs"
        assert f'scope="{scope}"' in challenge


def test_error_bodies_say_what_is_wrong(keyed):
    missing = keyed.get("/model")
    malformed = keyed.get("/model", headers={"Authorization": "Basic abc"})
    unknown = keyed.get("/model", headers={"Authorization": f"Bearer {UNKNOWN_KEY}"})

    assert missing.json()["detail"][0]["msg"] == (
        "this endpoint needs an API key: send the header `Authorization: Bearer <key>`"
    )
    assert missing.headers["www-authenticate"] == 'Bearer realm="mlplatform"'
    assert malformed.json()["detail"][0]["msg"].startswith(
        "the Authorization header must be `Bearer <key>`"
    )
    assert unknown.json()["detail"][0]["msg"] == "the API key is not valid (unknown, or revoked)"
    assert 'error="invalid_token"' in unknown.headers["www-authenticate"]


def test_health_is_public_and_minimal_without_a_predict_key(keyed, champion):
    public = keyed.get("/healthz")
    with_feedback_key = keyed.get("/healthz", headers={"Authorization": f"Bearer {FEEDBACK_KEY}"})
    with_predict_key = keyed.get("/healthz", headers={"Authorization": f"Bearer {PREDICT_KEY}"})
    unknown = keyed.get("/healthz", headers={"Authorization": f"Bearer {UNKNOWN_KEY}"})
    malformed = keyed.get("/healthz", headers={"Authorization": "Bearer"})

    # The release (versions, stage, share) is public: the endpoint sensor compares it.
    release = {
        "champion": champion.version,
        "challenger": None,
        "stage": None,
        "canary_share": 0.0,
        "rollout_id": None,
    }
    minimal = {"status": "ok", "model_version": champion.version, "release": release}
    assert public.status_code == 200 and public.json() == minimal
    assert with_feedback_key.json() == minimal
    assert with_predict_key.json() == minimal | {
        "model_name": "mlplatform",
        "pid": os.getpid(),  # the answering process: this one, in process
        "traffic": None,
        "versions": [{"version": champion.version, "role": "champion", "traffic": None}],
        "shadow": {"scored_requests": 0, "failed_records": 0, "dropped_requests": 0},
        "feedback": {"failed_writes": 0},
    }
    # A key sent to /healthz is checked like anywhere else: a wrong one is not ignored.
    assert unknown.status_code == 401 and malformed.status_code == 401
    for response in (public, with_feedback_key, with_predict_key, unknown, malformed):
        _check_no_secret(response)


def test_unknown_paths_need_a_key_too(keyed):
    assert keyed.get("/admin").status_code == 401
    assert keyed.get("/admin", headers={"Authorization": f"Bearer {FEEDBACK_KEY}"}).status_code == (
        404
    )


def test_openapi_declares_the_key_on_every_route_but_health(keyed):
    schema = keyed.get("/openapi.json", headers={"Authorization": f"Bearer {PREDICT_KEY}"}).json()

    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>`.",
    }
    secured = {
        path: all(op.get("security") == [{"apiKey": []}] for op in operations.values())
        for path, operations in schema["paths"].items()
    }
    assert secured == {
        "/predict": True,
        "/feedback": True,
        "/healthz": False,
        "/model": True,
        "/model/card": True,
    }


def test_without_keys_every_route_stays_open(champion):
    client = TestClient(build_api(champion, LIMITS))
    record = champion.card.example_record

    assert client.post("/predict", json={"records": [record]}).status_code == 200
    assert client.get("/model").status_code == 200
    assert client.get("/openapi.json").json().get("components", {}).get("securitySchemes") is None
    assert set(client.get("/healthz").json()) == {
        "status",
        "model_name",
        "model_version",
        "pid",
        "release",
        "traffic",
        "versions",
        "shadow",
        "feedback",
    }


def test_the_printed_curl_example_sends_the_key_from_the_shell():
    info = EndpointInfo(
        url="http://127.0.0.1:8000",
        model_name="mlplatform",
        model_version="3",
        model_uri="models:/mlplatform/3",
        deployed_at="2026-11-30T12:00:00+00:00",
        example_record={"age": 35},
    )
    keyed = dataclasses.replace(info, requires_key=True)

    assert info.curl_example == (
        "curl -s -X POST http://127.0.0.1:8000/predict -H 'Content-Type: application/json' "
        """-d '{"records": [{"age": 35}]}'"""
    )
    assert keyed.curl_example == (
        'curl -s -X POST http://127.0.0.1:8000/predict -H "Authorization: Bearer '
        """$MLPLATFORM_API_KEY" -H 'Content-Type: application/json' """
        """-d '{"records": [{"age": 35}]}'"""
    )
    assert "export MLPLATFORM_API_KEY=<an API key with the predict scope>" in _try_it_text(keyed)
    assert "MLPLATFORM_API_KEY" not in _try_it_text(info)


# ---------------------------------------------------------------------------------------------
# Through Ray Serve, over HTTP


def _session_log_dir() -> Path:
    """The log directory of the Ray session this process is connected to (the test's head)."""
    import ray

    (node,) = ray.nodes()
    return Path(node["ObjectStoreSocketName"]).parents[1] / "logs"


def test_a_keyed_endpoint_through_ray_serve_never_shows_a_key(
    serve_port, tmp_path_factory, instance
):
    platform, _ = train_champion(tmp_path_factory.mktemp("keys-live-home"), seed=4)
    settings = ServingSettings.for_deployment(
        ServingKnobs(access_log=True),  # the replica's access log is read below
        model_uri="models:/mlplatform@champion",
        tracking_uri=platform.tracking_uri,
        feedback_db=str(platform.feedback_db),
    )
    with deployed(settings, serve_port, "keys", api_keys=_digests()) as url:
        record = httpx.get(
            f"{url}/model", headers={"Authorization": f"Bearer {PREDICT_KEY}"}
        ).json()["example_record"]

        def predict(key: str | None) -> httpx.Response:
            return httpx.post(
                f"{url}/predict", json={"records": [record]}, headers=bearer_headers(key)
            )

        answers = {
            "no key": predict(None),
            "unknown key": predict(UNKNOWN_KEY),
            "wrong scope": predict(FEEDBACK_KEY),
            "right scope": predict(PREDICT_KEY),
            "both scopes": httpx.post(
                f"{url}/feedback",
                json={"labels": [{"request_id": "0" * 32, "label": 1}]},
                headers={"Authorization": f"Bearer {BOTH_KEY}"},
            ),
            "public health": httpx.get(f"{url}/healthz"),
        }
        # What the endpoint sensor reads, without a key: the served version.
        assert cluster.observe_endpoint(url).version == "1"
        # The status command and the traffic simulator present their keys.
        registry = MlflowClient(tracking_uri=platform.tracking_uri)
        status = {
            name: collect_status(instance, registry, "mlplatform", url, headers=bearer_headers(key))
            for name, key in (("predict", PREDICT_KEY), ("none", None), ("unknown", UNKNOWN_KEY))
        }
        keyed = simulate(
            url,
            rate=10,
            duration_s=1,
            label_share=1.0,
            label_delay_s=0.1,
            predict_key=PREDICT_KEY,
            feedback_key=FEEDBACK_KEY,
        )
        keyless = simulate(url, rate=10, duration_s=0.5)

    assert status["predict"].served_version == "1" and "traffic" in status["predict"].endpoint
    assert status["none"].endpoint == {
        "status": "ok",
        "model_version": "1",
        "release": Release(champion="1").model_dump(),
    }
    assert status["unknown"].endpoint is None
    assert status["unknown"].endpoint_error == (
        "/healthz refused the API key (HTTP 401): check MLPLATFORM_API_KEY"
    )
    assert keyed.ok == keyed.requests == 10 and keyed.labels_sent == 10
    assert keyless.ok == 0 and keyless.errors == {"401": keyless.requests}

    statuses = {case: response.status_code for case, response in answers.items()}
    assert statuses == {
        "no key": 401,
        "unknown key": 401,
        "wrong scope": 403,
        "right scope": 200,
        "both scopes": 200,
        "public health": 200,
    }
    assert answers["no key"].headers["www-authenticate"].startswith("Bearer")
    assert answers["public health"].json() == {
        "status": "ok",
        "model_version": "1",
        "release": Release(champion="1").model_dump(),
    }
    for response in answers.values():
        _check_no_secret(response)
    # Nothing any Ray process of the session wrote (replica, proxy, controller, workers, the
    # access log of every request above) holds a key.
    logs = [path for path in _session_log_dir().rglob("*") if path.is_file()]
    assert any("replica" in path.name for path in logs)
    for path in logs:
        content = path.read_bytes()
        assert not any(secret.encode() in content for secret in SECRETS), path


def test_a_running_deployment_is_untouched_by_a_refused_exposed_deploy(
    serve_port, tmp_path_factory
):
    platform, _ = train_champion(tmp_path_factory.mktemp("keys-exposed-home"), seed=4)
    settings = ServingSettings(
        model_uri="models:/mlplatform@champion", tracking_uri=platform.tracking_uri
    )
    with deployed(settings, serve_port, "exposed") as url:
        from ray import serve

        before = serve.status().applications["exposed"].last_deployed_time_s
        with pytest.raises(ExposedWithoutKeys):
            cluster.deploy(
                settings.model_copy(update={"max_records": 7}),
                ray_address=None,
                host="0.0.0.0",
                port=serve_port,
                app_name="exposed",
                local_head=None,
                route_prefix="/exposed",
            )
        assert serve.status().applications["exposed"].last_deployed_time_s == before
        assert httpx.get(f"{url}/healthz").json()["model_version"] == "1"
        # The old, open deployment still answers without a key.
        assert httpx.get(f"{url}/model").status_code == 200
