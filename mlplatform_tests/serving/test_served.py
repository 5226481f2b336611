"""A release of two versions in process: who answers, fallback to the champion, shadow scoring.

The champion is a real model trained by the platform's assets; the challenger is that model
under another version number, or one that fails on a share of records (a release gone wrong).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from mlplatform.monitoring.evidence import VersionCounts
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.release import REQUEST_KEY_HEADER, Release, answered_by_challenger
from mlplatform.serving.routes import build_api
from mlplatform.serving.served import ReleaseMember, ServedRelease, ShadowScorer
from mlplatform.serving.settings import ServingKnobs
from mlplatform_tests.support import loan_records, train_champion

LIMITS = ServingKnobs(max_records=50)


@dataclasses.dataclass(frozen=True)
class FailingModel(ServedModel):
    """A version that cannot score records whose income is above ``limit`` (a bug of its own)."""

    limit: float = 0.0

    def predict(self, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        if any((record["income"] or 0) > self.limit for record in records):
            raise RuntimeError("challenger bug: income out of the range it handles")
        return super().predict(records)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    """v1, trained by the real assets and loaded as a replica loads it."""
    platform, _ = train_champion(tmp_path_factory.mktemp("served-home"), seed=4)
    return load_served_model("models:/mlplatform/1", platform.tracking_uri)


def _release(
    champion: ServedModel, challenger: ServedModel, stage: str, share: float = 0.0
) -> ServedRelease:
    release = Release(
        champion="1", challenger="2", stage=stage, canary_share=share, rollout_id="v2-test"
    )
    return ServedRelease(
        release,
        ReleaseMember(champion, "champion", counts=VersionCounts()),
        ReleaseMember(challenger, release.stage, counts=VersionCounts()),
    )


def _failing(champion: ServedModel, records: list[dict]) -> FailingModel:
    """v2 failing on about half of ``records`` (those above their median income)."""
    incomes = sorted(record["income"] or 0 for record in records)
    fields = {f.name: getattr(champion, f.name) for f in dataclasses.fields(champion)}
    return FailingModel(**fields | {"version": "2"}, limit=incomes[len(incomes) // 2])


def test_in_canary_a_request_the_challenger_fails_is_answered_by_the_champion(champion):
    records = loan_records(200, seed=31)
    served = _release(champion, _failing(champion, records), "canary", share=0.5)
    client = TestClient(build_api(served, LIMITS), raise_server_exceptions=False)
    keys = [f"user-{n}" for n in range(len(records))]
    answers = [
        client.post("/predict", json={"records": [record]}, headers={REQUEST_KEY_HEADER: key})
        for key, record in zip(keys, records, strict=True)
    ]
    assert {answer.status_code for answer in answers} == {200}
    limit = served.challenger.model.limit
    for key, record, answer in zip(keys, records, answers, strict=True):
        challenger_answers = answered_by_challenger(key, 0.5) and (record["income"] or 0) <= limit
        assert answer.json()["model_version"] == ("2" if challenger_answers else "1")
        assert answer.headers["X-Model-Role"] == ("canary" if challenger_answers else "champion")
    assigned = [answered_by_challenger(key, 0.5) for key in keys]
    failed = sum(a and (r["income"] or 0) > limit for a, r in zip(assigned, records, strict=True))
    assert failed > 0
    assert (served.challenger.counts.requests, served.challenger.counts.errors) == (
        sum(assigned),
        failed,
    )
    # The champion answered its own keys and the challenger's failures.
    assert served.champion.counts.requests == len(records) - sum(assigned) + failed
    assert served.champion.counts.errors == 0


def test_in_canary_a_batch_the_challenger_fails_is_answered_by_the_champion(champion):
    records = loan_records(20, seed=32)
    served = _release(champion, _failing(champion, records), "canary", share=0.99)
    client = TestClient(build_api(served, LIMITS), raise_server_exceptions=False)
    answer = client.post("/predict", json={"records": records}, headers={REQUEST_KEY_HEADER: "a"})
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    assert (served.challenger.counts.requests, served.challenger.counts.errors) == (1, 1)


def test_in_shadow_the_champion_answers_and_the_challenger_scores_the_same_records(champion):
    records = loan_records(60, seed=33)
    challenger = _failing(champion, records)
    served = _release(champion, challenger, "shadow")
    shadow = ShadowScorer()
    client = TestClient(build_api(served, LIMITS, shadow=shadow))
    singles = [client.post("/predict", json={"records": [record]}) for record in records[:50]]
    batch = client.post("/predict", json={"records": records[50:]})
    assert {a.json()["model_version"] for a in [*singles, batch]} == {"1"}
    assert shadow.wait_idle()
    over = sum((r["income"] or 0) > challenger.limit for r in records[:50])
    batch_fails = any((r["income"] or 0) > challenger.limit for r in records[50:])
    # Every request was scored by both; the challenger's failures are its own, never an answer's.
    assert served.champion.counts.requests == served.challenger.counts.requests == 51
    assert served.challenger.counts.errors == over + batch_fails
    assert shadow.stats.scored_requests == 51 - over - batch_fails
    assert served.champion.counts.errors == 0


def test_a_full_shadow_queue_drops_and_counts_instead_of_waiting(champion):
    served = _release(champion, dataclasses.replace(champion, version="2"), "shadow")
    shadow = ShadowScorer(max_queued=0)
    client = TestClient(build_api(served, LIMITS, shadow=shadow))
    for record in loan_records(5, seed=34):
        assert client.post("/predict", json={"records": [record]}).status_code == 200
    assert shadow.stats.dropped_requests == 5 and shadow.stats.scored_requests == 0
