"""Canary assignment: the share holds within binomial bounds, sticky per key, nested as it grows."""

import math

import pytest

from mlplatform.serving.release import Release, answered_by_challenger

KEYS = [f"client-{i}" for i in range(10_000)]


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_the_challenger_answers_its_share_of_keys_within_binomial_bounds(share):
    answered = sum(answered_by_challenger(key, share) for key in KEYS)
    bound = 4 * math.sqrt(len(KEYS) * share * (1 - share))  # four standard deviations
    assert abs(answered - share * len(KEYS)) <= bound


def test_a_key_always_gets_the_same_model_and_a_larger_share_only_adds_keys():
    at_10 = {key for key in KEYS if answered_by_challenger(key, 0.1)}
    assert at_10 == {key for key in KEYS if answered_by_challenger(key, 0.1)}
    at_20 = {key for key in KEYS if answered_by_challenger(key, 0.2)}
    assert at_10 < at_20


def test_no_share_and_the_whole_share_are_exact_and_others_are_refused():
    assert not any(answered_by_challenger(key, 0.0) for key in KEYS)
    assert all(answered_by_challenger(key, 1.0) for key in KEYS)
    with pytest.raises(ValueError, match="within"):
        answered_by_challenger("k", 1.5)


def test_a_release_without_a_rollout_is_answered_by_the_champion():
    release = Release(champion="3")
    assert {release.answering_version(key) for key in KEYS[:100]} == {"3"}
    assert not release.shadowed


def test_in_shadow_the_champion_answers_and_the_challenger_scores_beside_it():
    release = Release(champion="3", challenger="4", stage="shadow", rollout_id="v4-1")
    assert {release.answering_version(key) for key in KEYS[:100]} == {"3"}
    assert release.shadowed
    assert release.rollout_label == "v4 in shadow"
    assert release.versions == ("3", "4") and Release(champion="3").versions == ("3",)


def test_in_canary_the_challenger_answers_the_keys_of_its_share():
    release = Release(
        champion="3", challenger="4", stage="canary", canary_share=0.2, rollout_id="v4-1"
    )
    assert release.rollout_label == "v4 in canary at 20%"
    answered = {key: release.answering_version(key) for key in KEYS}
    assert {key for key, version in answered.items() if version == "4"} == {
        key for key in KEYS if answered_by_challenger(key, 0.2)
    }
    assert set(answered.values()) == {"3", "4"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"challenger": "4", "rollout_id": "r"}, "go together"),
        ({"stage": "shadow", "rollout_id": "r"}, "go together"),
        ({"challenger": "4", "stage": "shadow"}, "go together"),
        ({"challenger": "3", "stage": "shadow", "rollout_id": "r"}, "its own challenger"),
        ({"challenger": "4", "stage": "canary", "rollout_id": "r"}, "between 0 and 1"),
        (
            {"challenger": "4", "stage": "canary", "canary_share": 1.0, "rollout_id": "r"},
            "between 0 and 1",
        ),
        ({"stage": "promoted", "challenger": "4"}, "stage"),
        ({"canary_share": 2}, "canary_share"),
        ({"replicas": 2}, "replicas"),
    ],
)
def test_an_inconsistent_release_is_refused_with_its_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        Release(champion="3", **fields)
