"""Shared fixtures: an isolated platform home per test, one real Ray Serve instance per session."""

import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

import mlplatform.serving  # noqa: F401  (sets Ray's loopback mode before Ray is imported)
from mlplatform.demo.data import generate_loans
from mlplatform.model.spec import FeatureSpec, infer_feature_spec
from mlplatform.resources import DataSource, MlflowTracking, RayServe
from mlplatform.serving.cluster import LocalHead
from mlplatform.serving.ingress import fast_ingress_environment
from mlplatform_tests.support import free_port, isolate_platform


@pytest.fixture(autouse=True)
def platform_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own platform home and none of the caller's platform settings."""
    home = tmp_path / "home"
    isolate_platform(monkeypatch, home)
    return home


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A persistent Dagster instance for the test, so several runs share asset history."""
    directory = tmp_path / "dagster"
    directory.mkdir()
    with dg.instance_for_test(temp_dir=str(directory)) as test_instance:
        yield test_instance


@pytest.fixture
def small_loans_csv(tmp_path: Path) -> Path:
    """A small demo-like dataset as a user's CSV."""
    path = tmp_path / "loans.csv"
    generate_loans(n_rows=1200, seed=3).to_csv(path, index=False)
    return path


@pytest.fixture
def sliced() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Eight rows in three regions, labels and probabilities, small enough to count by hand.

    Region a: 4 rows, 2 positives (one caught), 2 negatives (one flagged).
    Region b: 3 rows, 1 positive (caught), 2 negatives (none flagged).
    Missing region: 1 positive row, missed.
    """
    frame = pd.DataFrame(
        {
            "region": ["a", "a", "a", "a", "b", "b", "b", None],
            "amount": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, np.nan],
        }
    )
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    probability = np.array([0.9, 0.2, 0.8, 0.1, 0.7, 0.3, 0.4, 0.1])
    return frame, labels, probability


@pytest.fixture(scope="session")
def recorded_loans() -> tuple[pd.DataFrame, FeatureSpec]:
    """2,000 demo loans and their feature spec, the traffic the recorder tests send."""
    frame = generate_loans(n_rows=2000, seed=3)
    spec = infer_feature_spec(frame, "defaulted")
    return frame.reset_index(drop=True), spec


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHead]:
    """One real Ray head for the whole session, connected to from this process.

    Started the way the platform starts its own (``LocalHead``: ``ray start`` in a session of
    its own, a token of its own, the fast serving path), so the tests serve the way ``make run``
    does, and nothing Ray does to its process group can reach this process. Stopped by its
    process group at the end, leaving any other Ray on the machine alone.
    """
    import ray

    # In this process too, before Ray reads them: driver and head agree on the serving path.
    for name, value in fast_ingress_environment(single_node=True).items():
        os.environ.setdefault(name, value)
    # Its metrics export port too, for the tests that scrape it with Prometheus.
    head = LocalHead(free_port(), tmp_path_factory.mktemp("ray"), metrics_port=free_port())
    address = head.ensure_running()
    try:  # stopped also when connecting to it fails, not only after the session
        os.environ.update(head.auth_environment())
        ray.init(
            address=address,
            log_to_driver=False,
            namespace="mlplatform-tests",
            _node_ip_address="127.0.0.1",
        )
        yield head
    finally:
        ray.shutdown()
        head.stop()


@pytest.fixture(scope="session")
def serve_port(ray_head: LocalHead) -> Iterator[int]:
    """Ray Serve on the session's head, listening on 127.0.0.1 at a port of its own."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture
def training_resources(small_loans_csv: Path) -> dict[str, dg.ConfigurableResource]:
    """The real data and MLflow resources on the test's home and data (no serving)."""
    return {
        "data_source": DataSource(uri=str(small_loans_csv), target="defaulted"),
        "mlflow_tracking": MlflowTracking(),
    }


@pytest.fixture
def resources(
    training_resources: dict[str, dg.ConfigurableResource], serve_port: int
) -> dict[str, dg.ConfigurableResource]:
    """Every real platform resource, serving on the session's Ray Serve port."""
    return training_resources | {"ray_serve": RayServe(port=serve_port)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the session's Ray Serve (directly or through a fixture) are ``ray`` tests.

    So ``pytest -m "not ray"`` runs everything that needs no Ray cluster. Tests that start a Ray
    head of their own carry the marker explicitly.
    """
    for item in items:
        if {"ray_head", "serve_port"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
