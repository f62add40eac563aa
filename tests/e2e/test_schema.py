"""Schema versioning on a 3-node cluster of its own: the registry, the cluster view, readiness
gated on compatibility, and a rolling upgrade (HarmonyLite's run-schema-migration-test.sh
scenario, and more).

- Every node is in the registry; `-schema-status-cluster` says `consistent` (exit 0).
- ALTER TABLE ... ADD COLUMN on node 1 and writes using the new column: nodes 2 and 3 hold
  those changesets, the cluster reports `upgrading` (exit 0), every node stays ready, and the
  other nodes' writes keep replicating. Node 2, restarted while holding, keeps what it holds.
- The same ALTER on nodes 2 and 3: everything held applies, all dumps identical.
- Two more ALTERs on node 1 only: node 1 is not ready with the reason, nodes 2 and 3 stay ready
  and keep replicating between themselves; `-schema-status-cluster` says `incompatible` (exit 1).
- Held changesets are bounded (schema.max_held_bytes, 1 MiB here): a burst of writes with a new
  column passes the bound on the nodes that wait; they stop storing it, read it again once the
  migration frees room, and lose nothing. A forged origin publishing changesets for a foreign
  schema hits the bound, is reported, and nothing else stalls.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import harness
from harness import REPL_TIMEOUT, wait_until
from test_operator import http, value

MAX_HELD = 1 << 20
SETTINGS = {"schema": {"heartbeat": 1, "max_held_bytes": MAX_HELD}}
NOTES = "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"


@pytest.fixture(scope="module")
def trio(hl_bin, tmp_path_factory):
    with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("schema"), size=3, settings=SETTINGS,
                                 schema=harness.BOOKS_SCHEMA + NOTES) as c:
        yield c


def schema(node) -> dict:
    return json.loads(http(node, "/schema")[1])


def cluster(node) -> dict:
    return schema(node).get("cluster") or {}


def readyz(node) -> tuple[int, dict]:
    code, body, _ = http(node, "/readyz")
    return code, json.loads(body)


def schema_check(node) -> dict:
    return [c for c in readyz(node)[1]["checks"] if c["name"] == "schema"][0]


def status_cluster(hl_bin, node, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(hl_bin), "-config", str(node.config_path), "-schema-status-cluster", *extra],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def status_local(hl_bin, node, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(hl_bin), "-config", str(node.config_path), "-schema-status", *extra],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def wait_status(nodes, status: str, live: int = 3) -> None:
    for n in nodes:
        wait_until(lambda: cluster(n).get("status") == status and cluster(n).get("live_nodes") == live,
                   REPL_TIMEOUT, f"node {n.id} sees the cluster {status} with {live} live nodes")


def held_from(node, origin: int) -> int:
    return sum(e["waiting_for_schema"] for e in schema(node)["held"] if e["origin"] == origin)


def note(node, nid: int):
    rows = node.query("SELECT body FROM notes WHERE id = ?", (nid,))
    return rows[0][0] if rows else None


def test_registry_lists_every_node_consistent(trio, hl_bin):
    wait_status(trio.nodes, "consistent")
    view = cluster(trio.node(1))
    assert len(view["groups"]) == 1
    assert sorted(n["node_id"] for n in view["groups"][0]["nodes"]) == [1, 2, 3]
    assert view["groups"][0]["schema_hash"] == schema(trio.node(2))["schema_hash"]
    assert "books" in view["groups"][0]["nodes"][0]["tables"]
    r = status_cluster(hl_bin, trio.node(1))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("cluster schema: consistent (3 live nodes)"), r.stdout
    r = status_cluster(hl_bin, trio.node(2), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "consistent"
    alone = subprocess.run([str(hl_bin), "-config", str(trio.node(1).config_path), "-json"], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert alone.returncode == 2 and "-schema-status" in alone.stderr, alone.stderr


def test_rolling_upgrade(trio, hl_bin):
    n1, n2, n3 = trio.nodes
    h0 = schema(n1)["schema_hash"]

    # Node 1 migrates first and writes with the new column.
    n1.executescript("ALTER TABLE books ADD COLUMN isbn TEXT")
    wait_until(lambda: schema(n1)["previous_schema_hash"] == h0, REPL_TIMEOUT, "node 1 saw its schema change")
    h1 = schema(n1)["schema_hash"]
    for i in range(5):
        n1.execute("INSERT INTO books (id, title, author, publication_year, isbn) VALUES (?, ?, 'n1', 2024, ?)",
                   (700 + i, f"new {i}", f"isbn-{i}"))
    for n in (n2, n3):
        wait_until(lambda: held_from(n, 1) >= 1, REPL_TIMEOUT, f"node {n.id} holds node 1's changesets")
    wait_status(trio.nodes, "upgrading")
    for n in trio.nodes:
        code, body = readyz(n)
        assert code == 200, f"node {n.id} not ready while one step apart: {body}"
    r = status_cluster(hl_bin, n2)
    assert r.returncode == 0 and "cluster schema: upgrading" in r.stdout, r.stdout + r.stderr
    assert f"schema {h1}: 1 node" in r.stdout and f"schema {h0}: 2 nodes" in r.stdout, r.stdout
    local = status_local(hl_bin, n2)
    assert local.returncode == 0, local.stderr
    assert f"schema hash: {h0}" in local.stdout and "held from origin 1:" in local.stdout, local.stdout
    local = json.loads(status_local(hl_bin, n3, "-json").stdout)
    assert local["schema_hash"] == h0 and [e for e in local["held"] if e["origin"] == 1]

    # The other nodes keep replicating meanwhile (a table the change does not touch, and books).
    n2.execute("INSERT INTO notes (id, body) VALUES (1, 'from 2 while upgrading')")
    n3.execute("INSERT INTO books (id, title, author, publication_year) VALUES (801, 'old schema', 'n3', 2020)")
    for n in trio.nodes:
        harness.wait_equal(lambda: note(n, 1), "from 2 while upgrading", REPL_TIMEOUT, f"node 2's note on {n.id}")
        harness.wait_equal(lambda: n.scalar("SELECT count(*) FROM books WHERE id = 801"), 1, REPL_TIMEOUT,
                           f"node 3's book on node {n.id}")

    # Node 2 restarts while holding: it keeps what it holds.
    held_before = held_from(n2, 1)
    n2.restart()
    wait_until(lambda: readyz(n2)[0] == 200, REPL_TIMEOUT, "node 2 ready after its restart")
    wait_until(lambda: held_from(n2, 1) == held_before, REPL_TIMEOUT, "node 2 still holds node 1's changesets")
    assert n2.scalar("SELECT count(*) FROM books WHERE id >= 700 AND id < 705") == 0

    # Nodes 2 and 3 migrate: everything held applies, nothing lost.
    for n in (n2, n3):
        n.executescript("ALTER TABLE books ADD COLUMN isbn TEXT")
    for n in (n2, n3):
        wait_until(lambda: held_from(n, 1) == 0, REPL_TIMEOUT, f"node {n.id} applied what it held")
        assert n.query("SELECT isbn FROM books WHERE id = 704") == [("isbn-4",)]
    dump = trio.wait_converged()
    assert len([r for r in dump["books"][1] if 700 <= r[0][1] < 705]) == 5  # each value is (typeof, value)
    wait_status(trio.nodes, "consistent")

    # Two more steps on node 1 alone: node 1 is the odd one out.
    h1 = schema(n1)["schema_hash"]
    n1.executescript("ALTER TABLE books ADD COLUMN a2 TEXT")
    wait_until(lambda: schema(n1)["previous_schema_hash"] == h1, REPL_TIMEOUT, "node 1 saw the first step")
    h2 = schema(n1)["schema_hash"]
    n1.executescript("ALTER TABLE books ADD COLUMN a3 TEXT")
    wait_until(lambda: schema(n1)["previous_schema_hash"] == h2, REPL_TIMEOUT, "node 1 saw the second step")
    wait_until(lambda: readyz(n1)[0] == 503, REPL_TIMEOUT, "node 1 not ready")
    check = schema_check(n1)
    assert not check["ok"] and "incompatible" in check["reason"] and "2 of 3 live nodes" in check["reason"], check
    wait_status(trio.nodes, "incompatible")
    for n in (n2, n3):
        code, body = readyz(n)
        assert code == 200, f"node {n.id} is not at fault but not ready: {body}"
    n2.execute("INSERT INTO notes (id, body) VALUES (2, 'between 2 and 3')")
    n3.execute("INSERT INTO notes (id, body) VALUES (3, 'between 3 and 2')")
    harness.wait_equal(lambda: note(n3, 2), "between 2 and 3", REPL_TIMEOUT, "node 2's note on node 3")
    harness.wait_equal(lambda: note(n2, 3), "between 3 and 2", REPL_TIMEOUT, "node 3's note on node 2")
    r = status_cluster(hl_bin, n3)
    assert r.returncode == 1 and "cluster schema: incompatible" in r.stdout, r.stdout + r.stderr
    assert json.loads(status_cluster(hl_bin, n3, "-json").stdout)["status"] == "incompatible"

    # The others catch up: node 1 is ready again and everything converges.
    for n in (n2, n3):
        n.executescript("ALTER TABLE books ADD COLUMN a2 TEXT; ALTER TABLE books ADD COLUMN a3 TEXT")
    wait_until(lambda: readyz(n1)[0] == 200, REPL_TIMEOUT, "node 1 ready again")
    trio.wait_converged()


def deferred(node) -> float:
    return value(node, "harmonylite_changesets_deferred_total", node_id=str(node.id))


def test_burst_past_the_bound_is_read_again_and_nothing_is_lost(trio):
    n1, n2, n3 = trio.nodes
    d0 = {n.id: deferred(n) for n in (n2, n3)}
    n1.executescript("ALTER TABLE books ADD COLUMN cover BLOB")
    # 40 changesets of 64 KiB each (random: zstd cannot shrink them): 2.5 MiB, over the 1 MiB bound.
    for i in range(40):
        n1.execute("INSERT INTO books (id, title, author, cover) VALUES (?, ?, 'burst', randomblob(65536))",
                   (900 + i, f"burst {i}"))
    for n in (n2, n3):
        wait_until(lambda: deferred(n) > d0[n.id], REPL_TIMEOUT, f"node {n.id} deferred changesets at the bound")
        wait_until(lambda: value(n, "harmonylite_held_bound_streams", node_id=str(n.id)) == 1, REPL_TIMEOUT,
                   f"node {n.id} reports the stream held back")
        assert value(n, "harmonylite_held_bytes", node_id=str(n.id)) <= MAX_HELD
        code, body = readyz(n)
        assert code == 200, f"node {n.id}: a bound hit must not fail readiness: {body}"
        assert "schema.max_held_bytes" in schema_check(n)["reason"], schema_check(n)
        assert "schema.max_held_bytes" in n.log_since_start()
    # The others keep replicating meanwhile, on the same stream.
    n2.execute("INSERT INTO notes (id, body) VALUES (10, 'while bounded')")
    for n in (n1, n3):
        harness.wait_equal(lambda: note(n, 10), "while bounded", REPL_TIMEOUT, f"node 2's note on node {n.id}")
    # The migration frees the room: the rest is read again, nothing is lost.
    for n in (n2, n3):
        n.executescript("ALTER TABLE books ADD COLUMN cover BLOB")
    for n in (n2, n3):
        wait_until(lambda: value(n, "harmonylite_held_bound_streams", node_id=str(n.id)) == 0, REPL_TIMEOUT,
                   f"node {n.id} reads the stream again")
    trio.wait_converged()
    for n in trio.nodes:
        assert n.scalar("SELECT count(*) FROM books WHERE id >= 900 AND id < 940 AND length(cover) = 65536") == 40


def test_forged_origin_hits_the_bound_and_nothing_else_stalls(trio):
    n1, n2, n3 = trio.nodes
    origin, epoch = 9301, 3
    foreign = os.urandom(32)
    d0 = {n.id: deferred(n) for n in trio.nodes}
    msgs = []
    for seq in range(1, 41):
        payload = harness.encode_changeset(origin, epoch, seq, foreign, [["ghost", ["id", "junk"], ["id"]]],
                                           [[0, harness.OP_UPSERT, harness.now_hlc(), [seq], [seq, os.urandom(65536)]]])
        msgs += harness.build_messages(origin, epoch, seq, payload)
    harness.js_publish(n1.nats_url, msgs)
    for n in trio.nodes:
        wait_until(lambda: deferred(n) > d0[n.id], REPL_TIMEOUT, f"node {n.id} stopped storing the forged origin")
        assert value(n, "harmonylite_held_bytes", node_id=str(n.id)) <= MAX_HELD
        assert readyz(n)[0] == 200
    # Nothing else stalls: every node's writes still reach every other node.
    for n in trio.nodes:
        n.execute("INSERT INTO notes (id, body) VALUES (?, 'after the forgery')", (100 + n.id,))
    for n in trio.nodes:
        for m in trio.nodes:
            harness.wait_equal(lambda: note(n, 100 + m.id), "after the forgery", REPL_TIMEOUT,
                               f"node {m.id}'s note on node {n.id}")


def test_bad_registry_entries_are_ignored(trio):
    bucket = "harmonylite-schema"
    bad = [b"not json", b'{"node_id":"78","schema_hash":"zz","tables":[]}',
           json.dumps({"node_id": "1", "schema_hash": "a" * 64, "previous_schema_hash": None, "tables": [],
                       "version": "forged", "started_ms": 1, "heartbeat_ms": 1}).encode()]
    for key, data in zip(("node.77", "node.78", "node.79"), bad):
        harness.js_publish(trio.node(1).nats_url, [(data, None)], subject=f"$KV.{bucket}.{key}", stream=f"KV_{bucket}")
    for n in trio.nodes:
        wait_until(lambda: "schema registry entry ignored" in n.log_since_start(), REPL_TIMEOUT,
                   f"node {n.id} logged the bad entries")
        view = cluster(n)
        assert view["live_nodes"] == 3, view
        assert "forged" not in json.dumps(view)
        assert readyz(n)[0] == 200


def test_graceful_stop_leaves_the_registry(trio, hl_bin):
    n3 = trio.node(3)
    h3 = schema(n3)["schema_hash"]
    n3.stop()
    try:
        for n in trio.nodes[:2]:
            wait_until(lambda: cluster(n).get("live_nodes") == 2, REPL_TIMEOUT,
                       f"node {n.id} sees node 3 gone from the registry")
        # -schema-status needs only the database: node 3's NATS server is down with it.
        r = status_local(hl_bin, n3)
        assert r.returncode == 0 and f"schema hash: {h3}" in r.stdout, r.stdout + r.stderr
    finally:
        n3.start()
    wait_status(trio.nodes, cluster(trio.node(1))["status"])


def test_killed_node_expires_from_the_registry(trio):
    n3 = trio.node(3)
    n3.kill()
    try:
        for n in trio.nodes[:2]:
            wait_until(lambda: cluster(n).get("live_nodes") == 2, REPL_TIMEOUT,
                       f"node {n.id} sees node 3's entry expire (3 heartbeats of 1 s)")
    finally:
        n3.start()
    for n in trio.nodes:
        wait_until(lambda: cluster(n).get("live_nodes") == 3, REPL_TIMEOUT, f"node {n.id} sees node 3 back")


def test_a_node_with_another_heartbeat_has_no_view_and_stays_ready(trio):
    n3 = trio.node(3)
    n3.restart(settings={"schema": {"heartbeat": 2}})
    try:
        wait_until(lambda: "schema registry unreachable" in n3.log_since_start(), REPL_TIMEOUT,
                   "node 3 reports the registry bucket it cannot use")
        assert "kv bucket exists with other settings" in n3.log_since_start()
        wait_until(lambda: readyz(n3)[0] == 200, REPL_TIMEOUT, "node 3 ready without a registry view")
        assert schema(n3)["cluster"] is None
    finally:
        n3.restart(settings={"schema": {"heartbeat": 1}})
    wait_until(lambda: (cluster(n3) or {}).get("live_nodes") == 3, REPL_TIMEOUT, "node 3 back in the registry")
