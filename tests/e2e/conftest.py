"""Fixtures for the end-to-end tests: the binary, and a shared 3-node cluster.

Starting a cluster costs seconds (three nats-servers forming a JetStream
cluster), so one cluster is shared by consecutive tests. A test that leaves it
in a special state (a node stopped for good, a node reconfigured) marks it
dirty with `cluster.dirty = "why"`, and so does any failing test; the next test
then gets a fresh cluster. A cluster that fails to start fails every later test
at once instead of timing out again.

Environment:
  HARMONYLITE_BIN     binary under test (default build/harmonylite)
  HL_E2E_ALLOW_SKIP=1 skip the suite when the binary does not exist (default: fail)
  HL_E2E_VERBOSE=1    start nodes with logging.verbose
  HL_E2E_SEED         seed of the randomized tests (shown with every failure)
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

import pytest

import harness

atexit.register(harness.kill_all_nodes)

SEED = int(os.environ.get("HL_E2E_SEED") or time.time_ns() % 1_000_000_007)


def _binary_state() -> tuple[Path, bool]:
    path = harness.harmonylite_binary()
    return path, path.is_file() and os.access(path, os.X_OK)


def pytest_collection_modifyitems(config, items):
    path, ok = _binary_state()
    if not ok and os.environ.get("HL_E2E_ALLOW_SKIP") == "1":
        marker = pytest.mark.skip(reason=f"harmonylite binary not found at {path} (HL_E2E_ALLOW_SKIP=1)")
        for item in items:
            item.add_marker(marker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed:
        rep.sections.append(("random seed", f"rerun with HL_E2E_SEED={SEED}"))


@pytest.fixture(scope="session")
def hl_bin() -> Path:
    path, ok = _binary_state()
    if not ok:
        pytest.fail(f"harmonylite binary not found or not executable at {path}; build it (scripts/build.sh) "
                    f"or set HARMONYLITE_BIN (HL_E2E_ALLOW_SKIP=1 skips the suite instead)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def seed() -> int:
    return SEED


class ClusterPool:
    """Hands out the shared cluster, replacing it when it is dirty."""

    def __init__(self, binary: Path, tmp_factory):
        self.binary = binary
        self.tmp_factory = tmp_factory
        self.current: harness.Cluster | None = None
        self.broken: str | None = None

    def get(self) -> harness.Cluster:
        if self.broken:
            pytest.fail(f"an earlier cluster failed to start, not trying again:\n{self.broken}", pytrace=False)
        c = self.current
        if c is not None and (c.dirty or not c.all_running()):
            self.discard()
        if self.current is None:
            c = harness.Cluster(self.binary, self.tmp_factory.mktemp("cluster"))
            c.init_databases(harness.BOOKS_SCHEMA)
            try:
                c.start()
            except AssertionError as e:
                self.broken = str(e) + "\n" + c.log_tails(30)
                c.kill()
                pytest.fail(f"cluster failed to start:\n{self.broken}", pytrace=False)
            self.current = c
        return self.current

    def discard(self) -> list[str]:
        c, self.current = self.current, None
        if c is None:
            return []
        errors = c.stop()
        c.kill()
        return errors


@pytest.fixture(scope="session")
def cluster_pool(hl_bin, tmp_path_factory):
    pool = ClusterPool(hl_bin, tmp_path_factory)
    yield pool
    errors = pool.discard()
    if errors:
        pytest.fail("nodes did not stop cleanly at the end of the session:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def cluster(cluster_pool, request) -> harness.Cluster:
    """The shared 3-node cluster (nodes 1..3, node 3 configured through flags).

    After the test: any node that died on its own, or a sanitizer report in a
    log, fails the test; a failed or dirty test gets the cluster replaced.
    """
    c = cluster_pool.get()
    yield c
    problems = []
    for n in c.dead_nodes():
        problems.append(f"node {n.id} died during the test (exit status {n.proc.returncode})\n{n.log_tail()}")
        n.expected_running = False
    for n in c.nodes:
        try:
            n.check_log_clean()
        except AssertionError as e:
            problems.append(str(e))
    failed = any(getattr(request.node, "rep_" + w, None) is not None and getattr(request.node, "rep_" + w).failed
                 for w in ("setup", "call"))
    if failed:
        print("\n" + "\n".join(problems) + "\n" + c.log_tails(80))
        c.dirty = c.dirty or "a test failed on it"
    if problems:
        c.dirty = c.dirty or "a node crashed"
    if c.dirty:
        problems += cluster_pool.discard()
    if problems and not failed:
        pytest.fail("\n".join(problems), pytrace=False)
