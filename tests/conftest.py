"""Shared pytest setup: netns test gating, fixtures, log tails on failure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from fabric.testbed.testnet import FabricCluster, Topology, cleanup_stale

# Callables returning log text; appended to the report of a failing test.
LOG_SOURCES: list[Callable[[], str]] = []


def netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "netns tests need root (network namespaces, TUN devices)"
    if shutil.which("wireguard-go") is None:
        return "wireguard-go not installed (apt-get install wireguard-go; scripts/setup.sh does it)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "netns: end-to-end test in network namespaces (needs root, wireguard-go)"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    # Namespaces of an earlier run that was killed hard (older than an hour, so
    # a run in progress elsewhere on this machine is left alone).
    if netns_skip_reason() is None and shutil.which("ip"):
        cleanup_stale("fab", min_age=3600)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        reason = netns_skip_reason()
        if reason:
            pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call") and LOG_SOURCES:
        chunks = []
        for source in LOG_SOURCES:
            try:
                chunks.append(source())
            except Exception as e:  # never hide the real failure
                chunks.append(f"<log source failed: {e}>")
        report.sections.append(("process logs (tails)", "\n".join(chunks)))


def _topology(clients: int) -> Iterator[Topology]:
    with Topology(clients=clients) as t:
        LOG_SOURCES.append(t.log_tails)
        try:
            yield t
        finally:
            LOG_SOURCES.remove(t.log_tails)


@pytest.fixture
def topo2() -> Iterator[Topology]:
    """A server namespace and two client namespaces; logs attached on failure."""
    yield from _topology(2)


@pytest.fixture
def topo3() -> Iterator[Topology]:
    """A server namespace and three client namespaces; logs attached on failure."""
    yield from _topology(3)


@pytest.fixture
def fab(topo2: Topology) -> Iterator[FabricCluster]:
    """A broker, 2 edges and 2 workers on 198.19.100.1/24, UDP 51820, in topo2's server
    namespace; at the end no fabric process may have died during the test."""
    cluster = FabricCluster(topo2, address="198.19.100.1/24", listen_port=51820, edges=2, workers=2)
    cluster.start()
    yield cluster
    cluster.check_alive()
    cluster.stop()

