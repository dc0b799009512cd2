"""Real Redis HA topologies from the server binaries on loopback, one per module; always torn
down. See authz/demo/cluster.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from authz.demo.cluster import ClusterSetup, SentinelSetup


@pytest.fixture(scope="module")
def sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    with SentinelSetup(tmp_path_factory.mktemp("sentinel")) as s:
        yield s


@pytest.fixture(scope="module")
def cluster_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    with ClusterSetup(tmp_path_factory.mktemp("cluster")) as c:
        yield c
