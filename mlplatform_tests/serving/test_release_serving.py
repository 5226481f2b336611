"""A release of two versions served over HTTP: shadow, canary, promotion, all without restarts."""

import sqlite3
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from mlplatform.demo.data import TARGET
from mlplatform.monitoring.evidence import read_stage_counts
from mlplatform.serving import cluster
from mlplatform.serving.release import REQUEST_KEY_HEADER, Release, answered_by_challenger
from mlplatform.serving.settings import ServingSettings
from mlplatform.settings import PlatformSettings
from mlplatform_tests.support import (
    deployed,
    isolate_platform,
    loan_records,
    register_copy,
    train_champion,
    wait_for,
)

pytestmark = pytest.mark.ray

SHADOW = Release(champion="1", challenger="2", stage="shadow", rollout_id="v2-test")


@pytest.fixture
def platform(tmp_path: Path) -> PlatformSettings:
    """A platform home of the test's own: v1 trained on the demo loans, v2 a copy of it."""
    home = tmp_path / "platform"
    home.mkdir()
    settings, _ = train_champion(home, seed=5)
    with pytest.MonkeyPatch.context() as patch:
        isolate_platform(patch, home)
        assert register_copy("1", tmp_path / "copy") == "2"
    return settings


def _serving(platform: PlatformSettings) -> ServingSettings:
    return ServingSettings(
        model_name="mlplatform",
        tracking_uri=platform.tracking_uri,
        traffic_dir=str(platform.traffic_dir),
        feedback_db=str(platform.feedback_db),
    )


def _logged(platform: PlatformSettings, table: str) -> list[tuple]:
    """(request_id, row_index, model_version) of every prediction in a table of the log."""
    with sqlite3.connect(platform.feedback_db) as connection:
        return connection.execute(
            f"SELECT request_id, row_index, model_version FROM {table}"
        ).fetchall()


def test_in_shadow_the_champion_answers_and_both_versions_predictions_are_logged(
    platform, serve_port
):
    records = [{k: v for k, v in r.items() if k != TARGET} for r in loan_records(40, seed=8)]
    with deployed(_serving(platform), serve_port, "shadow", release=SHADOW) as url:
        answers = [
            httpx.post(f"{url}/predict", json={"records": [record]}, timeout=30)
            for record in records[:30]
        ]
        batch = httpx.post(f"{url}/predict", json={"records": records[30:]}, timeout=30)
        assert {a.status_code for a in [*answers, batch]} == {200}
        assert {a.json()["model_version"] for a in [*answers, batch]} == {"1"}
        assert {a.headers["X-Model-Role"] for a in [*answers, batch]} == {"champion"}
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert health["release"] == SHADOW.model_dump()
        assert [(v["version"], v["role"]) for v in health["versions"]] == [
            ("1", "champion"),
            ("2", "shadow"),
        ]
        expected = {(a.json()["request_id"], 0) for a in answers} | {
            (batch.json()["request_id"], i) for i in range(10)
        }

        def both_logged() -> bool:
            answered = {(rid, i) for rid, i, v in _logged(platform, "predictions") if v == "1"}
            shadowed = {(rid, i) for rid, i, v in _logged(platform, "shadow_predictions")}
            return answered == expected and shadowed == expected

        wait_for(both_logged, timeout=30)

        def counted(version: str) -> int:
            traffic = platform.traffic_dir
            return read_stage_counts(traffic, "mlplatform", "v2-test", "shadow", version).requests

        wait_for(lambda: counted("1") == counted("2") == 31, timeout=30)
        assert (
            read_stage_counts(platform.traffic_dir, "mlplatform", "v2-test", "shadow", "2").p99_ms
            is not None
        )


def test_in_canary_each_key_is_answered_by_the_version_its_hash_picks(platform, serve_port):
    canary = SHADOW.model_copy(update={"stage": "canary", "canary_share": 0.3})
    record = {k: v for k, v in loan_records(1, seed=9)[0].items() if k != TARGET}
    keys = [f"user-{n}" for n in range(2000)]
    with (
        deployed(_serving(platform), serve_port, "canary", release=canary) as url,
        httpx.Client(timeout=30) as client,
    ):

        def version_for(key: str) -> tuple[str, str]:
            answer = client.post(
                f"{url}/predict", json={"records": [record]}, headers={REQUEST_KEY_HEADER: key}
            )
            assert answer.status_code == 200, answer.text
            return answer.json()["model_version"], answer.headers["X-Model-Role"]

        answered = {key: version_for(key) for key in keys}
        again = {key: version_for(key) for key in keys[:200]}
    # Sticky: a key is answered by one version, whichever replica and whenever.
    assert all(again[key] == answered[key] for key in again)
    assert all(
        answered[key]
        == (("2", "canary") if answered_by_challenger(key, 0.3) else ("1", "champion"))
        for key in keys
    )
    share = Counter(version for version, _ in answered.values())["2"] / len(keys)
    # Binomial bounds of a 30% share over 2,000 keys: 4.4 standard deviations (1e-5 two-sided).
    assert abs(share - 0.3) < 4.4 * (0.3 * 0.7 / len(keys)) ** 0.5


def test_stage_changes_under_load_fail_no_request_and_restart_no_replica(platform, serve_port):
    record = {k: v for k, v in loan_records(1, seed=10)[0].items() if k != TARGET}
    serving = _serving(platform)
    stages = [
        SHADOW,
        SHADOW.model_copy(update={"stage": "canary", "canary_share": 0.5}),
        Release(champion="2"),
    ]
    failures: list[str] = []
    seen: Counter[str] = Counter()
    stop = threading.Event()
    with deployed(serving, serve_port, "stages", release=Release(champion="1")) as url:
        pid = httpx.get(f"{url}/healthz", timeout=10).json()["pid"]

        def client(number: int) -> None:
            with httpx.Client(timeout=30) as session:
                sent = 0
                while not stop.is_set():
                    sent += 1
                    answer = session.post(
                        f"{url}/predict",
                        json={"records": [record]},
                        headers={REQUEST_KEY_HEADER: f"client-{number}-{sent}"},
                    )
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    else:
                        seen[answer.json()["model_version"]] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            for release in stages:
                before = sum(seen.values())
                cluster.deploy(
                    serving,
                    ray_address=None,
                    host="127.0.0.1",
                    port=serve_port,
                    app_name="stages",
                    local_head=None,
                    route_prefix="/stages",
                    release=release,
                )
                cluster.wait_until_serving(url, release.champion, rollout=release.rollout_label)
                wait_for(lambda before=before: sum(seen.values()) > before + 50, timeout=30)
                assert httpx.get(f"{url}/healthz", timeout=10).json()["pid"] == pid
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert failures == []
    assert seen["1"] > 0 and seen["2"] > 0
    print(f"FIGURE stage changes under load: {sum(seen.values())} answered, 0 failed, {dict(seen)}")
