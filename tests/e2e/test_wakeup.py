"""End-to-end tests: isolated writes from a long-lived application connection.

A real application (PocketBase, anything with a connection pool) keeps its
SQLite connection open, so its commits leave no close event behind: the engine
is woken only by the write to the -wal file, which happens before the commit is
visible in the wal-index. Each row here is committed alone, with a random pause
of 50-200 ms, and must reach the other node without any later write coming to
help it along.

Own pair of nodes (external NATS, one replica) so the polling interval can be
set. The writing node does not replicate: otherwise the echo of its own
changeset makes it record a stream position a second later, a write of its own
that happens to pick up a commit a lost wake-up missed, and the bug shows only
as a second of lag. Nothing here measures time: rows get a generous timeout
each, and without the fix some never arrive.
"""

from __future__ import annotations

import random

import pytest

import harness

#: Per row: far longer than any wake-up needs, so only a lost wake-up fails.
ROW_TIMEOUT = 10.0
ROWS_PER_MODE = 40


@pytest.fixture
def pair(hl_bin, tmp_path, request):
    """Two nodes on one nats-server with the polling interval of the test's
    parameter; node 1 only publishes."""
    server = harness.NatsServer(tmp_path / "nats")
    nodes = [harness.Node(hl_bin, tmp_path / f"node{i}", i, 0, 0, harness.free_port(), [],
                          external_urls=[server.url],
                          settings={"replication_log": {"replicas": 1}, "polling_interval": request.param,
                                    "replicate": i != 1})
             for i in (1, 2)]
    try:
        server.start()
        for n in nodes:
            n.executescript(harness.BOOKS_SCHEMA)
            n.start(wait=False)
        for n in nodes:
            n.wait_started()
        yield nodes
        for n in nodes:
            n.stop()
            n.check_log_clean()
    finally:
        for n in nodes:
            n.kill()
        server.stop()


def isolated_writes(writer_node, reader_node, seed, synchronous):
    """Commits ROWS_PER_MODE single-row transactions on one open connection,
    waiting for each row on the other node before pausing and writing the next."""
    rng = random.Random(seed)
    conn = writer_node.connect()
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    reader = reader_node.connect()
    try:
        for i in range(ROWS_PER_MODE):
            title = f"lone write {synchronous} {i}"
            rid = conn.execute("INSERT INTO books (title, author, publication_year) VALUES (?, 'x', 2024)",
                               (title,)).lastrowid

            def arrived(rid=rid):
                rows = reader.execute("SELECT title FROM books WHERE id = ?", (rid,)).fetchall()
                return rows and rows[0][0]

            harness.wait_equal(arrived, title, ROW_TIMEOUT,
                               f"row {rid} ({title!r}, synchronous={synchronous}) on node {reader_node.id} with "
                               f"no later write to wake node {writer_node.id}", interval=0.005)
            harness.time.sleep(rng.uniform(0.05, 0.2))
    finally:
        conn.close()
        reader.close()


@pytest.mark.parametrize("pair", [0], indirect=True, ids=["polling_interval=0"])
def test_isolated_writes_long_lived_connection_inotify_only(pair, seed):
    """With the fallback poll off, every lone commit is still captured."""
    n1, n2 = pair
    for sync in ("NORMAL", "FULL"):
        isolated_writes(n1, n2, seed, sync)


@pytest.mark.parametrize("pair", [1000], indirect=True, ids=["polling_interval=1000"])
def test_isolated_writes_long_lived_connection_default_poll(pair, seed):
    """The same with the default poll: every row arrives (no time is asserted)."""
    n1, n2 = pair
    for sync in ("NORMAL", "FULL"):
        isolated_writes(n1, n2, seed, sync)
