"""Canary assignment: the share holds within binomial bounds, sticky per key, nested as it grows."""

import math

import pytest

from mlplatform.serving.release import answered_by_challenger

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
