"""Property-based fuzzing of the endpoint from its own OpenAPI schema: no request gets a 5xx.

Schemathesis generates requests for every route from the schema the app publishes (the model's
features by kind, its classes, the limits): requests that fit it (positive) and requests that
break it (negative), from a fixed seed, a bounded number per route and mode. Every answer must be
below 500. The routes are fuzzed in process (no Ray) around a model scored through its pipeline
and one scored by the fast path (and once with API keys, every request presenting one), and the
live Ray Serve endpoint, with its micro-batcher, traffic
recorder and prediction log, with fewer examples.
"""

from collections import Counter
from collections.abc import Callable, Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis import Case
from schemathesis.generation.modes import GenerationMode
from schemathesis.schemas import APIOperation, BaseSchema

from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.serving.keys import key_digests, parse_api_keys
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.routes import build_api
from mlplatform.serving.settings import ServingKnobs, ServingSettings
from mlplatform_tests.serving.test_hostile_input import with_lightgbm
from mlplatform_tests.support import deployed, train_champion

SEED = 20_251_130
"""Hypothesis' seed: the same requests on every run."""
IN_PROCESS_EXAMPLES = 100
LIVE_EXAMPLES = 15
LIMITS = ServingKnobs(max_records=20, max_body_bytes=64 * 1024, max_feedback_labels=50)
ROUTES = {"POST /predict", "POST /feedback", "GET /healthz", "GET /model", "GET /model/card"}

Statuses = dict[str, Counter[int]]
"""Per ``"<route> <mode>"``: how many answers had each status code."""


def _takes_input(operation: APIOperation) -> bool:
    """Whether there is anything to break (a GET without parameters has one request only)."""
    return bool(len(operation.body) or list(operation.iter_parameters()))


def _fuzz_operation(
    operation: APIOperation, mode: GenerationMode, max_examples: int, call: Callable[[Case], int]
) -> Counter[int]:
    """Send up to ``max_examples`` generated requests of one route and mode; fail on a 5xx."""
    seen: Counter[int] = Counter()

    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=max_examples,
        database=None,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Case) -> None:
        status = call(case)
        seen[status] += 1
        assert status < 500, f"{case.method} {case.formatted_path}: {status}"

    send()
    return seen


def fuzz(schema: BaseSchema, max_examples: int, call: Callable[[Case], int]) -> Statuses:
    """Fuzz every route of ``schema``, with valid requests and, where it has input, broken ones.

    Args:
        schema: the endpoint's OpenAPI schema, as schemathesis loaded it.
        max_examples: the bound per route and generation mode.
        call: sends a case, returns the status code.

    Returns:
        The status codes seen, per route and mode.

    """
    statuses: Statuses = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            if mode.is_positive or _takes_input(operation):
                statuses[f"{operation.label} {mode}"] = _fuzz_operation(
                    operation, mode, max_examples, call
                )
    return statuses


def _summary(statuses: Statuses) -> str:
    return "\n".join(f"{label}: {dict(sorted(seen.items()))}" for label, seen in statuses.items())


def check_no_server_error(statuses: Statuses) -> None:
    """Every route was fuzzed, answered every request below 500, and valid records were scored."""
    print(
        f"{sum(map(sum, (s.values() for s in statuses.values())))} requests\n{_summary(statuses)}"
    )
    assert {label.rsplit(" ", 1)[0] for label in statuses} == ROUTES
    assert all(sum(seen.values()) > 0 for seen in statuses.values()), _summary(statuses)
    assert all(status < 500 for seen in statuses.values() for status in seen)
    # The generated records reach the model, not only validation.
    assert statuses["POST /predict positive"][200] > 0, _summary(statuses)
    assert statuses["POST /feedback positive"][200] > 0, _summary(statuses)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    """A champion trained by the real assets (a linear model on this data), loaded for serving."""
    platform, _ = train_champion(tmp_path_factory.mktemp("fuzz-home"), seed=4)
    return load_served_model("models:/mlplatform@champion", platform.tracking_uri)


@pytest.mark.parametrize("scored_by", ["pipeline", "fast path"])
def test_the_routes_never_answer_a_server_error(champion, scored_by, tmp_path):
    model = with_lightgbm(champion) if scored_by == "fast path" else champion
    app = build_api(model, LIMITS, feedback=FeedbackStore(tmp_path / "feedback.sqlite"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)

    statuses = fuzz(schema, IN_PROCESS_EXAMPLES, lambda case: case.call().status_code)

    check_no_server_error(statuses)


def test_a_keyed_endpoint_never_answers_a_server_error(champion, tmp_path):
    key = "fuzzing-key-0123456789abcdef"
    keys = key_digests(parse_api_keys(f"predict,feedback:{key}", "test"))
    app = build_api(
        champion, LIMITS, feedback=FeedbackStore(tmp_path / "feedback.sqlite"), api_keys=keys
    )
    authorization = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=authorization)

    statuses = fuzz(
        schema, IN_PROCESS_EXAMPLES // 2, lambda case: case.call(headers=authorization).status_code
    )

    check_no_server_error(statuses)


@pytest.fixture(scope="module")
def live_url(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A champion served as `make run` serves it (traffic profiles, prediction log), at /fuzz."""
    platform, _ = train_champion(tmp_path_factory.mktemp("fuzz-live-home"), seed=4)
    settings = ServingSettings.for_deployment(
        LIMITS,
        model_uri="models:/mlplatform@champion",
        tracking_uri=platform.tracking_uri,
        traffic_dir=str(platform.traffic_dir),
        feedback_db=str(platform.feedback_db),
    )
    with deployed(settings, serve_port, "fuzz") as url:
        yield url


def test_the_live_endpoint_never_answers_a_server_error(live_url):
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")

    statuses = fuzz(schema, LIVE_EXAMPLES, lambda case: case.call(base_url=live_url).status_code)

    check_no_server_error(statuses)
