"""End-to-end tests of the fetcher: consumers that must recover, and changesets
whose parts never all arrive.

Each test starts its own cluster (settings the shared one does not have).
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest

import harness
from harness import REPL_TIMEOUT, SLOW_TIMEOUT, transaction, wait_until


def stream_leader(url: str, stream: str = harness.STREAM) -> str:
    """The server_name of the server holding (leading) the stream."""

    async def fn(nc, js):
        info = await js.stream_info(stream)
        return info.cluster.leader if info.cluster else ""

    return harness.run_nats(url, fn)


def readyz(node) -> dict:
    try:
        with urllib.request.urlopen(node.http_url + "/readyz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def metric(node, name: str) -> float:
    with urllib.request.urlopen(node.http_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"harmonylite_{name}{{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def own_cluster(hl_bin, tmp_path):
    clusters: list[harness.Cluster] = []

    def make(settings: dict) -> harness.Cluster:
        c = harness.Cluster(hl_bin, tmp_path / f"cluster{len(clusters)}", settings=settings)
        clusters.append(c)
        c.init_databases(harness.BOOKS_SCHEMA)
        c.start()
        return c

    yield make
    problems = []
    for c in clusters:
        for n in c.nodes:
            try:
                n.check_log_clean()
            except AssertionError as e:
                problems.append(str(e))
        problems += c.stop()
        c.kill()
    assert not problems, "\n".join(problems)


def test_fetchers_recover_while_the_stream_server_restarts(own_cluster, seed):
    """Streams with one replica live on one server. Restart the node whose
    server holds the stream, again and again, while another node writes:
    every reader must re-create its consumer from where it was and, in the
    end, every row must be everywhere."""
    cluster = own_cluster({"replication_log": {"replicas": 1}})
    rng = random.Random(seed)
    cluster.create_tables("CREATE TABLE restart_loop (id INTEGER PRIMARY KEY, origin INTEGER NOT NULL, v TEXT)",
                          ["restart_loop"])
    leader = wait_until(lambda: stream_leader(cluster.nodes[0].nats_url), REPL_TIMEOUT, "the stream's leader")
    holder = next(n for n in cluster.nodes if leader == f"harmonylite-{n.id}")
    writer_node = next(n for n in cluster.nodes if n is not holder)
    stop = threading.Event()
    written: set[int] = set()
    errors: list[str] = []

    def writer():
        conn = writer_node.connect()
        i = 0
        try:
            while not stop.is_set():
                try:
                    with transaction(conn):
                        conn.execute("INSERT INTO restart_loop VALUES (?, ?, ?)", (i, writer_node.id, f"row {i}"))
                except sqlite3.OperationalError as e:
                    if "locked" in str(e) or "busy" in str(e):
                        continue
                    raise
                written.add(i)
                i += 1
                time.sleep(0.02)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"writer on node {writer_node.id}: {e!r}")
        finally:
            conn.close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(5):
            time.sleep(rng.uniform(1.0, 4.0))
            assert holder.running, f"node {holder.id} exited on its own\n{holder.log_tail()}"
            holder.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            holder.start(wait=False)
        holder.wait_started()
        time.sleep(rng.uniform(1.0, 3.0))
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    # One more row after the loop: it has to arrive too.
    writer_node.execute("INSERT INTO restart_loop VALUES (?, ?, 'after the loop')", (10_000_000, writer_node.id))
    written.add(10_000_000)
    for n in cluster.nodes:
        harness.wait_equal(lambda: {r[0] for r in n.query("SELECT id FROM restart_loop")}, written, SLOW_TIMEOUT,
                           f"all {len(written)} written rows on node {n.id}")
    cluster.wait_converged(["restart_loop"])
    for n in cluster.nodes:
        wait_until(lambda: readyz(n).get("ready"), SLOW_TIMEOUT, f"node {n.id} ready again")
