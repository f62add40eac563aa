"""Transactions bigger than a changeset (docs/protocol.md §1.5), on a 3-node cluster of its own.

A transaction of any size replicates: it travels as a chain of changesets and every
receiver applies it as one transaction, so a reader never sees part of it. A single
row larger than any changeset can be is reported, not retried in silence.
"""

from __future__ import annotations

import json
import threading

import pytest

import harness
from harness import SLOW_TIMEOUT, REPL_TIMEOUT, wait_until
from test_operator import http, value

# A chain member of at most 16 KiB: a few hundred rows.
SETTINGS = {"stall_timeout": 2, "replication_log": {"max_changeset_bytes": 65536, "replicas": 1}}


@pytest.fixture(scope="module")
def trio(hl_bin, tmp_path_factory):
    schema = harness.BOOKS_SCHEMA + "CREATE TABLE bulk (k TEXT PRIMARY KEY, n INTEGER, pad TEXT);"
    with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("big"), settings=SETTINGS, schema=schema) as c:
        yield c


def watch_counts(node, sql: str, stop: threading.Event, seen: set) -> threading.Thread:
    """Records every value a long-lived reader connection sees for sql until stop is set."""

    def run():
        conn = node.connect()
        try:
            while not stop.is_set():
                seen.add(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("compress", [False, True])
def test_transaction_bigger_than_a_changeset_replicates_whole(trio, compress):
    n1, n2, n3 = trio.nodes
    if n1.settings["replication_log"].get("compress") is not compress:
        for n in trio.nodes:
            n.settings["replication_log"]["compress"] = compress
            n.stop()
        trio.start()
    chains0 = [value(n, "harmonylite_chains_applied_total", node_id=str(n.id)) for n in (n2, n3)]
    tag = f"c{int(compress)}"
    rows = 30000
    stop, seen = threading.Event(), {2: set(), 3: set()}
    readers = [watch_counts(n, f"SELECT count(*) FROM bulk WHERE k LIKE '{tag}-%'", stop, seen[n.id]) for n in (n2, n3)]
    try:
        conn = n1.connect()
        with harness.transaction(conn):
            conn.executemany("INSERT INTO bulk (k, n, pad) VALUES (?, ?, ?)",
                             ((f"{tag}-{i:06d}", i, "x" * 40) for i in range(rows)))
        for n in (n2, n3):
            harness.wait_equal(lambda: n.scalar(f"SELECT count(*) FROM bulk WHERE k LIKE '{tag}-%'"), rows,
                               SLOW_TIMEOUT, f"the {rows}-row transaction on node {n.id}")
        # The same rows rewritten in one transaction: updates travel as a chain too.
        with harness.transaction(conn):
            conn.execute("UPDATE bulk SET n = -n WHERE k LIKE ?", (f"{tag}-%",))
        conn.close()
        for n in (n2, n3):
            harness.wait_equal(lambda: n.scalar(f"SELECT count(*) FROM bulk WHERE k LIKE '{tag}-%' AND n <= 0"),
                               rows, SLOW_TIMEOUT, f"the {rows}-row update on node {n.id}")
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    for nid, values in seen.items():
        assert values <= {0, rows}, f"a reader on node {nid} saw part of the transaction: {sorted(values)[:10]}"
    for n, c0 in zip((n2, n3), chains0):
        assert value(n, "harmonylite_chains_applied_total", node_id=str(n.id)) >= c0 + 2
    trio.wait_converged(["bulk"], timeout=SLOW_TIMEOUT)
    for n in trio.nodes:
        assert http(n, "/readyz")[0] == 200


def test_row_larger_than_any_changeset_is_reported(trio):
    n1, n2, _ = trio.nodes
    failures0 = value(n1, "harmonylite_engine_failures_total", node_id="1")
    n1.execute("INSERT INTO bulk (k, n, pad) VALUES ('huge', 1, ?)", ("y" * 100_000,))

    def not_ready():
        code, body, _ = http(n1, "/readyz")
        return code == 503 and body

    body = wait_until(not_ready, REPL_TIMEOUT, "node 1 reports that it cannot capture")
    check = [c for c in json.loads(body)["checks"] if c["name"] == "engine"][0]
    assert "max_changeset_bytes" in check["reason"], check
    assert value(n1, "harmonylite_engine_failures_total", node_id="1") > failures0
    # Nothing was lost meanwhile: once the row is gone (or the limit raised), capture resumes.
    n1.execute("DELETE FROM bulk WHERE k = 'huge'")
    n1.execute("INSERT INTO bulk (k, n, pad) VALUES ('after-huge', 2, 'small')")
    harness.wait_equal(lambda: n2.scalar("SELECT count(*) FROM bulk WHERE k = 'after-huge'"), 1, REPL_TIMEOUT,
                       "a later row on node 2")
    wait_until(lambda: http(n1, "/readyz")[0] == 200, REPL_TIMEOUT, "node 1 ready again")
