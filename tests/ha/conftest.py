"""Real Redis HA topologies from the server binaries on loopback, one per module; always torn
down. See tests/ha/cluster.py."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.ha.cluster import ClusterSetup, SentinelSetup


@pytest.fixture(scope="module")
def sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    with SentinelSetup(tmp_path_factory.mktemp("sentinel")) as s:
        yield s


@pytest.fixture(scope="module")
def cluster_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    with ClusterSetup(tmp_path_factory.mktemp("cluster")) as c:
        yield c


# Killing primaries and moving slots mid-flight leaves redis-py connections half made or
# half closed; the garbage collector finds them later and warns. Collect after every HA test,
# while its own warning filters apply, so those warnings stay with the fault that caused them
# instead of surfacing as "unraisable" errors in whatever test happens to run next.
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/ha/" in str(item.path):
            item.add_marker(pytest.mark.filterwarnings("ignore::ResourceWarning"))
            item.add_marker(
                pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
            )


@pytest.fixture(autouse=True)
def _collect_fault_debris() -> Iterator[None]:
    yield
    gc.collect()
