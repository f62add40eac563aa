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


def check_ok(node, name: str) -> bool:
    checks = {c["name"]: c for c in readyz(node).get("checks", [])}
    assert name in checks, f"node {node.id} /readyz has no check {name!r}: {list(checks)}"
    return checks[name]["ok"]


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
            # Back at once, or after the readers' consumers missed heartbeats.
            time.sleep(rng.choice([rng.uniform(0.0, 1.0), rng.uniform(3.0, 8.0)]))
            holder.start(wait=False)
        holder.wait_started()
        time.sleep(rng.uniform(1.0, 3.0))
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    # While the stream is away, a reader says so: /readyz and the metric.
    reader = next(n for n in cluster.nodes if n is not holder and n is not writer_node)
    holder.kill()
    wait_until(lambda: not check_ok(reader, "consumers"), SLOW_TIMEOUT,
               f"node {reader.id} reports its stalled consumer in /readyz")
    wait_until(lambda: metric(reader, "stream_consumer_stalled") == 1, SLOW_TIMEOUT,
               f"node {reader.id} reports its stalled consumer in /metrics")
    holder.start()
    # One more row after the loop: it has to arrive too.
    writer_node.execute("INSERT INTO restart_loop VALUES (?, ?, 'after the loop')", (10_000_000, writer_node.id))
    written.add(10_000_000)
    for n in cluster.nodes:
        harness.wait_equal(lambda: {r[0] for r in n.query("SELECT id FROM restart_loop")}, written, SLOW_TIMEOUT,
                           f"all {len(written)} written rows on node {n.id}")
    cluster.wait_converged(["restart_loop"])
    for n in cluster.nodes:
        wait_until(lambda: readyz(n).get("ready"), SLOW_TIMEOUT, f"node {n.id} ready again")


def stream_last_seq(url: str, stream: str = harness.STREAM) -> int:
    async def fn(nc, js):
        return (await js.stream_info(stream)).state.last_seq

    return harness.run_nats(url, fn)


def purge_before(url: str, seq: int, stream: str = harness.STREAM) -> None:
    """Removes every message below seq, as retention would."""

    async def fn(nc, js):
        await js.purge_stream(stream, seq=seq)

    harness.run_nats(url, fn)


def applied_seq(node) -> float:
    return metric(node, "stream_applied_sequence")


def test_incomplete_changesets_expire_and_nothing_is_lost(own_cluster):
    """A first part whose later parts never come must not pin the stream
    position (a restart after retention would report a false gap), and a
    changeset whose parts arrive late, or partly twice, must still apply."""
    cluster = own_cluster({"replication_log": {"duplicate_window": 2, "incomplete_expiry": 8}})
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE orphan_t (id INTEGER PRIMARY KEY, v TEXT)", ["orphan_t"])
    n1.execute("INSERT INTO orphan_t VALUES (1, 'genuine')")
    for n in (n2, n3):
        harness.wait_equal(lambda: n.query("SELECT v FROM orphan_t WHERE id = 1"), [("genuine",)], REPL_TIMEOUT,
                           f"row 1 on node {n.id}")

    def genuine_changeset():
        for cs in reversed(harness.changesets_in_stream(n1.nats_url, last=200)):
            if cs["origin"] == n1.id and any(t[0] == "orphan_t" for t in cs["body"][7]):
                return cs
        return None

    schema_hash = wait_until(genuine_changeset, REPL_TIMEOUT, "node 1's changeset in the stream")["body"][6]

    # A changeset of three parts from an origin that publishes slowly: part 0,
    # part 1, then (3 s later, longer than the duplicate window, shorter than
    # incomplete_expiry) part 0 again, as a re-publish stores it once the
    # window has forgotten it, and part 2.
    hlc = harness.now_hlc()
    payload = harness.encode_changeset(9200, 1, 1, schema_hash, [["orphan_t", ["id", "v"], ["id"]]],
                                       [[0, harness.OP_UPSERT, hlc, [10], [10, "three parts, late" + "x" * 300]]],
                                       hlc)
    parts = harness.build_messages(9200, 1, 1, payload, chunk=len(payload) // 3 + 1)
    assert len(parts) == 3
    harness.js_publish(n1.nats_url, parts[:2])
    n1.execute("INSERT INTO orphan_t VALUES (2, 'while parts are missing')")
    time.sleep(3)
    harness.js_publish(n1.nats_url, [(parts[0][0], parts[0][1] + "-again"), parts[2]])
    for n in cluster.nodes:
        harness.wait_equal(lambda: n.query("SELECT id FROM orphan_t WHERE id IN (2, 10) ORDER BY id"), [(2,), (10,)],
                           REPL_TIMEOUT, f"rows 2 and 10 on node {n.id}")

    # A first part whose second part never comes.
    harness.js_publish(n1.nats_url, [(harness.pack_header(9100, 1, 1, 0, 2, 200) + bytes(100), "orphan-0")])
    orphan_seq = stream_last_seq(n1.nats_url)
    n1.execute("INSERT INTO orphan_t VALUES (3, 'after the orphan')")
    for n in cluster.nodes:
        wait_until(lambda: metric(n, "changesets_expired_total") >= 1, SLOW_TIMEOUT,
                   f"node {n.id} expires the incomplete changeset")
    for n in (n2, n3):
        harness.wait_equal(lambda: n.query("SELECT id FROM orphan_t ORDER BY id"), [(1,), (2,), (3,), (10,)],
                           REPL_TIMEOUT, f"every row on node {n.id}")
    # The position moves past the orphan: retention may drop it, and a restart
    # finds no gap.
    last = stream_last_seq(n1.nats_url)
    for n in cluster.nodes:
        wait_until(lambda: applied_seq(n) >= last, SLOW_TIMEOUT,
                   f"node {n.id} records stream position {last} (orphan at {orphan_seq})")
    purge_before(n1.nats_url, last + 1)
    n2.stop()
    n2.start()
    wait_until(lambda: readyz(n2).get("ready"), SLOW_TIMEOUT, f"node 2 ready after the restart: {readyz(n2)}")
    n1.execute("INSERT INTO orphan_t VALUES (4, 'after the restart')")
    harness.wait_equal(lambda: n2.query("SELECT v FROM orphan_t WHERE id = 4"), [("after the restart",)],
                       REPL_TIMEOUT, "row 4 on node 2")
