"""Held changesets and a stuck engine, on a 2-node cluster of its own.

- A changeset whose predecessors never come (a forged or stray one, a node that lost its
  outbox) is held only for `order_hold_timeout`; then the missing ones are given up on, the
  held ones applied, and a missing one that still arrives later is applied then.
- A changeset held for the schema stays, is listed per origin in /schema, does not fail
  /readyz while the other nodes' changesets keep applying, and an operator can drop it with
  `harmonylite -drop-held ORIGIN`.
- An engine whose transactions keep failing turns /readyz not-ready after `stall_timeout`,
  with the reason, counts the failures, and recovers when the cause goes away.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import harness
from harness import REPL_TIMEOUT, wait_until
from test_operator import http, value

SETTINGS = {"order_hold_timeout": 2, "stall_timeout": 2, "replication_log": {"replicas": 1}}


@pytest.fixture(scope="module")
def pair(hl_bin, tmp_path_factory):
    with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("held"), size=2, settings=SETTINGS) as c:
        yield c


def schema_hash(node) -> bytes:
    return bytes.fromhex(json.loads(http(node, "/schema")[1])["schema_hash"])


def held(node) -> list[dict]:
    return json.loads(http(node, "/schema")[1])["held"]


def publish(node, origin: int, epoch: int, seq: int, tables: list, rows: list, hash_: bytes, tag: str = "") -> None:
    payload = harness.encode_changeset(origin, epoch, seq, hash_, tables, rows)
    msgs = harness.build_messages(origin, epoch, seq, payload)
    if tag:  # a second copy of the same changeset under other message ids
        msgs = [(data, f"{mid}-{tag}") for data, mid in msgs]
    harness.js_publish(node.nats_url, msgs)


BOOKS = [["books", ["id", "title", "author", "publication_year"], ["id"]]]


def book_row(book_id: int, title: str) -> list:
    return [0, harness.OP_UPSERT, harness.now_hlc(), [book_id], [book_id, title, "held", 2024]]


def title(node, book_id: int):
    rows = node.query("SELECT title FROM books WHERE id = ?", (book_id,))
    return rows[0][0] if rows else None


def assert_ready(node) -> None:
    code, body, _ = http(node, "/readyz")
    assert code == 200, f"node {node.id} not ready: {body}"


def test_missing_predecessors_are_given_up_on_and_applied_late(pair):
    n1, n2 = pair.nodes
    h = schema_hash(n1)
    origin, epoch = 9101, 77
    gaps0 = [value(n, "harmonylite_order_gaps_total", node_id=str(n.id)) for n in pair.nodes]
    late0 = [value(n, "harmonylite_changesets_late_total", node_id=str(n.id)) for n in pair.nodes]

    # Sequence 3 of a new origin whose 1 and 2 never came: held, then given up on after 2 s.
    publish(n1, origin, epoch, 3, BOOKS, [book_row(5003, "third")], h)
    for n in pair.nodes:
        harness.wait_equal(lambda: title(n, 5003), "third", REPL_TIMEOUT, f"held changeset 3 applied on node {n.id}")
        wait_until(lambda: held(n) == [], REPL_TIMEOUT, f"nothing held on node {n.id}")
        assert_ready(n)
        wait_until(lambda: value(n, "harmonylite_order_gaps_total", node_id=str(n.id)) == gaps0[n.id - 1] + 1,
                   REPL_TIMEOUT, f"one order gap counted on node {n.id}")
        assert "changesets 1 to 2 never arrived" in n.log_since_start()

    # The missing ones still arrive: applied, not dropped as duplicates.
    publish(n1, origin, epoch, 1, BOOKS, [book_row(5001, "first")], h)
    publish(n1, origin, epoch, 2, BOOKS, [book_row(5002, "second")], h)
    for n in pair.nodes:
        harness.wait_equal(lambda: title(n, 5001), "first", REPL_TIMEOUT, f"late changeset 1 on node {n.id}")
        harness.wait_equal(lambda: title(n, 5002), "second", REPL_TIMEOUT, f"late changeset 2 on node {n.id}")
        wait_until(lambda: value(n, "harmonylite_changesets_late_total", node_id=str(n.id)) == late0[n.id - 1] + 2,
                   REPL_TIMEOUT, f"two late changesets counted on node {n.id}")

    # A replay of an applied one is a duplicate again; the next one applies in order.
    dup0 = value(n1, "harmonylite_changesets_duplicate_total", node_id="1")
    publish(n1, origin, epoch, 1, BOOKS, [book_row(5001, "replayed")], h, tag="again")
    publish(n1, origin, epoch, 4, BOOKS, [book_row(5004, "fourth")], h)
    for n in pair.nodes:
        harness.wait_equal(lambda: title(n, 5004), "fourth", REPL_TIMEOUT, f"changeset 4 on node {n.id}")
        assert title(n, 5001) == "first"
    wait_until(lambda: value(n1, "harmonylite_changesets_duplicate_total", node_id="1") >= dup0 + 1, REPL_TIMEOUT,
               "the replay counted as a duplicate")
    for n in pair.nodes:
        assert_ready(n)


def test_schema_holds_are_listed_do_not_fail_readiness_and_can_be_dropped(pair, hl_bin):
    n1, n2 = pair.nodes
    origin, epoch = 9201, 5
    foreign = os.urandom(32)
    publish(n1, origin, epoch, 1, [["orders", ["id", "total"], ["id"]]],
            [[0, harness.OP_UPSERT, harness.now_hlc(), [1], [1, 99]]], foreign)
    for n in pair.nodes:
        entry = wait_until(lambda: [e for e in held(n) if e["origin"] == origin], REPL_TIMEOUT,
                           f"origin {origin} listed as held in /schema of node {n.id}")[0]
        assert entry["changesets"] == 1 and entry["waiting_for_schema"] == 1
        assert entry["first_seq"] == 1 and entry["applied_seq"] == 0
        assert entry["epoch"] == f"{epoch:016x}"
        assert "orders" in entry["reason"]
        code, body, _ = http(n, "/readyz")
        assert code == 200, f"a schema hold failed /readyz on node {n.id}: {body}"
        check = [c for c in json.loads(body)["checks"] if c["name"] == "schema"][0]
        assert check["ok"] and f"-drop-held {origin}" in check["reason"], check
        assert value(n, "harmonylite_held_origins", node_id=str(n.id)) >= 1

    # The live nodes' own changesets keep applying meanwhile.
    n2.execute("INSERT INTO books (id, title, author, publication_year) VALUES (6001, 'live', 'n2', 2024)")
    harness.wait_equal(lambda: title(n1, 6001), "live", REPL_TIMEOUT, "node 2's write on node 1")

    # The operator drops the hold on node 1, beside the running node.
    r = subprocess.run([str(hl_bin), "-config", str(n1.config_path), "-drop-held", str(origin)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert f"dropped 1 changesets held for node {origin}" in r.stdout, r.stdout
    wait_until(lambda: not [e for e in held(n1) if e["origin"] == origin], REPL_TIMEOUT, "hold gone on node 1")
    r = subprocess.run([str(hl_bin), "-config", str(n1.config_path), "-drop-held", str(origin)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "no changesets were held" in r.stdout, r.stdout + r.stderr
    bad = subprocess.run([str(hl_bin), "-config", str(n1.config_path), "-drop-held", "x"], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "-drop-held" in bad.stderr

    # The origin's next changeset applies on node 1; node 2 still holds it behind the first.
    publish(n1, origin, epoch, 2, BOOKS, [book_row(6002, "after drop")], schema_hash(n1))
    harness.wait_equal(lambda: title(n1, 6002), "after drop", REPL_TIMEOUT, "changeset 2 on node 1")
    wait_until(lambda: [e["changesets"] for e in held(n2) if e["origin"] == origin] == [2], REPL_TIMEOUT,
               "node 2 holds both")
    assert title(n2, 6002) is None
    assert_ready(n2)
    r = subprocess.run([str(hl_bin), "-config", str(n2.config_path), "-drop-held", str(origin)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "dropped 2 changesets" in r.stdout, r.stdout + r.stderr


def test_failing_engine_turns_readyz_not_ready_and_recovers(pair):
    n1, n2 = pair.nodes
    failures0 = value(n1, "harmonylite_engine_failures_total", node_id="1")
    # Every apply transaction on node 1 now fails (as on a full disk or a broken file, but
    # reversible): the engine must say so instead of retrying silently behind a 200.
    n1.execute("CREATE TRIGGER test_boom BEFORE UPDATE ON __harmonylite__ctl "
               "BEGIN SELECT RAISE(ABORT, 'test_boom: disk on fire'); END")
    n2.execute("INSERT INTO books (id, title, author, publication_year) VALUES (7001, 'stuck', 'n2', 2024)")

    def not_ready():
        code, body, _ = http(n1, "/readyz")
        return code == 503 and body

    body = wait_until(not_ready, REPL_TIMEOUT, "node 1 not ready while its transactions fail")
    check = [c for c in json.loads(body)["checks"] if c["name"] == "engine"][0]
    assert not check["ok"] and "test_boom: disk on fire" in check["reason"], check
    assert value(n1, "harmonylite_engine_failures_total", node_id="1") > failures0
    assert title(n1, 7001) is None
    assert_ready(n2)

    n1.execute("DROP TRIGGER test_boom")
    harness.wait_equal(lambda: title(n1, 7001), "stuck", REPL_TIMEOUT, "the row once the cause is gone")
    wait_until(lambda: http(n1, "/readyz")[0] == 200, REPL_TIMEOUT, "node 1 ready again")
