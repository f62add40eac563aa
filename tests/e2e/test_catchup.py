"""Catching up after the streams' retention (docs/snapshots.md, "Catching up"):
a node whose stream position is older than a stream's first message merges
the newest snapshot that covers the gap row by row, keeping its own writes,
instead of reporting a gap forever; without a covering snapshot it stays
not ready and says why and what to do; so does a node away longer than
tombstone_retention."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import harness
from harness import REPL_TIMEOUT, SLOW_TIMEOUT, wait_until

MAX_ENTRIES = 40  # messages a stream keeps: a few dozen writes roll it past a stopped node
# Each test takes its snapshots itself, when it needs them: no periodic ones
# (snapshot.interval 0), which would cover a gap the test wants uncovered.

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT NOT NULL, who INTEGER);"


def readyz(node) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(node.http_url + "/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (urllib.error.URLError, OSError):
        return 0, {}


def check(node, name: str) -> dict:
    code, body = readyz(node)
    return {c["name"]: c for c in body.get("checks", [])}.get(name, {})


def metric(node, name: str) -> float:
    with urllib.request.urlopen(node.http_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"harmonylite_{name}{{") or line.startswith(f"harmonylite_{name} "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def recorded_seq(node) -> int:
    return node.scalar("SELECT coalesce(max(seq), 0) FROM __harmonylite__seq") or 0


def save_snapshot(node) -> None:
    node.write_config()
    r = subprocess.run(node.argv("-save-snapshot"), capture_output=True, text=True, timeout=SLOW_TIMEOUT,
                       cwd=node.root)
    assert r.returncode == 0 and "snapshot saved to" in r.stdout, f"-save-snapshot: {r.stdout}\n{r.stderr}"


def roll_streams_past(cluster, n3_pos: int, start_id: int, max_entries: int = MAX_ENTRIES) -> int:
    """Writes on nodes 1 and 2, one commit at a time (one changeset each), until
    the stream's first message is past n3_pos + 1; returns the next free id."""
    n1, n2 = cluster.node(1), cluster.node(2)
    i = start_id
    # Nodes 1 and 2 settle after node 3 left (stream leadership may move) before the stream rolls:
    # a running reader that stalls while retention discards would have to catch up from a snapshot too.
    n1.execute("INSERT INTO items VALUES (?, 'settle', 1)", (i,))
    i += 1
    cluster.wait_converged(nodes=[n1, n2])
    deadline = time.monotonic() + SLOW_TIMEOUT
    while metric(n1, "stream_applied_sequence") < n3_pos + max_entries + 5:
        assert time.monotonic() < deadline, "the stream does not grow"
        n1.execute("INSERT INTO items VALUES (?, ?, 1)", (i, f"n1-{i}"))
        n2.execute("UPDATE items SET v = ?, who = 2 WHERE id = ?", (f"n2-{i}", i % 10 + 1))
        i += 1
        # Both readers keep up: one that stalls (its consumer lived on node 3's server) must be
        # back before retention discards what it has not read, or it would need a snapshot too.
        wait_until(lambda: abs(metric(n2, "stream_applied_sequence") - metric(n1, "stream_applied_sequence")) <= 5,
                   REPL_TIMEOUT, "nodes 1 and 2 keep up with the stream")
    n1.execute("DELETE FROM items WHERE id IN (9, 10)")
    cluster.wait_converged(nodes=[n1, n2])
    # node 1's recorded position reaches the stream's end: what its snapshot will say.
    wait_until(lambda: recorded_seq(n1) >= n3_pos + max_entries + 5, REPL_TIMEOUT,
               "node 1 records its position at the stream's end")
    return i


def test_node_behind_retention_merges_a_covering_snapshot_and_keeps_its_writes(hl_bin, tmp_path):
    store = tmp_path / "snapshots"
    store.mkdir()
    settings = {"replication_log": {"max_entries": MAX_ENTRIES},
                "snapshot": {"store": "dir", "dir": str(store), "interval": "0"}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=settings, schema=SCHEMA) as c:
        n1, n3 = c.node(1), c.node(3)
        for i in range(1, 11):
            n1.execute("INSERT INTO items VALUES (?, ?, 1)", (i, f"first-{i}"))
        c.wait_converged()
        save_snapshot(n1)  # an early snapshot: it will not reach past the gap
        time.sleep(1.5)  # node 3 records its position (lazily, every second)
        n3.stop()
        pos = recorded_seq(n3)
        assert pos > 0
        next_id = roll_streams_past(c, pos, 100)

        # 1. No snapshot covers the gap: not ready, saying why and what to do.
        n3.start()
        wait_until(lambda: "covers the gap" in check(n3, "gap").get("reason", ""), SLOW_TIMEOUT,
                   "node 3 reports that no snapshot covers its gap")
        reason = check(n3, "gap")["reason"]
        assert check(n3, "gap")["ok"] is False
        assert "-restore -force" in reason and "-save-snapshot" in reason, reason
        assert readyz(n3)[0] == 503
        assert metric(n3, "catchup_merges_total") == 0
        n3.stop()

        # 2. A covering snapshot, but node 3 was away longer than its tombstone_retention: rows
        # deleted meanwhile may have lost their tombstones everywhere, so no merge.
        save_snapshot(n1)
        time.sleep(1.5)
        n3.settings["tombstone_retention"] = 1
        n3.start()
        wait_until(lambda: "tombstone_retention" in check(n3, "gap").get("reason", ""), SLOW_TIMEOUT,
                   "node 3 refuses to merge after an absence longer than tombstone_retention")
        assert "-restore -force" in check(n3, "gap")["reason"]
        assert metric(n3, "catchup_merges_total") == 0
        time.sleep(1.5)  # a position read past the gap would be recorded by now
        n3.stop()
        del n3.settings["tombstone_retention"]
        # It read nothing past the gap: the next start still sees it (it is not forgotten).
        assert recorded_seq(n3) == pos

        # 3. Node 3's own writes while it is away, then it catches up from the covering snapshot.
        n3.executescript("INSERT INTO items VALUES (5000, 'n3-own', 3);"
                         "UPDATE items SET v = 'n3-edit', who = 3 WHERE id = 8;")
        n3.start()
        wait_until(lambda: readyz(n3)[0] == 200, SLOW_TIMEOUT, "node 3 ready after catching up")
        assert metric(n3, "catchup_merges_total") == 1
        assert metric(n3, "catchup_rows_merged_total") > 0
        assert "catch-up: merging snapshot" in n3.log_since_start()
        assert check(n3, "gap").get("ok") is True

        # 4. Replication goes on from the snapshot's position, both ways.
        n1.execute("INSERT INTO items VALUES (?, 'after', 1)", (next_id,))
        n3.execute("INSERT INTO items VALUES (5001, 'n3-after', 3)")
        dump = c.wait_converged(timeout=SLOW_TIMEOUT)
        rows = {r[0][1]: r[1][1].decode() for r in dump["items"][1]}
        assert rows[5000] == "n3-own" and rows[8] == "n3-edit" and rows[5001] == "n3-after", rows
        assert rows[next_id] == "after" and 9 not in rows and 10 not in rows
        assert not list(n3.root.glob(".app.db.merge-*")), "the downloaded snapshot is deleted"


def test_fresh_node_without_restore_catches_up_from_a_snapshot(hl_bin, tmp_path):
    """A new node whose application created its tables, started without the
    -restore init container after the streams dropped their first messages,
    joins a busy cluster (applications writing on nodes 1 and 2): it merges
    the newest snapshot into its database, converges, and replicates its own
    writes; every row written anywhere meanwhile is on every node."""
    store = tmp_path / "snapshots"
    store.mkdir()
    settings = {"replication_log": {"max_entries": MAX_ENTRIES},
                "snapshot": {"store": "dir", "dir": str(store), "interval": "0"}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=settings, schema=SCHEMA) as c:
        c.node(1).executescript("INSERT INTO items VALUES (1, 'first', 1);")
        roll_streams_past(c, 0, 2)
        save_snapshot(c.node(1))
        dump_n1 = {r[0][1]: r[1][1].decode() for r in c.node(1).dump()["items"][1]}
        fresh = harness.Node(hl_bin, tmp_path / "node4", 4, harness.free_port(), harness.free_port(),
                             harness.free_port(), [], settings=settings, external_urls=[c.node(1).nats_url])
        fresh.executescript(SCHEMA)
        # Writers slow enough that the stream (MAX_ENTRIES) still holds what came after the snapshot
        # when the fresh node has merged it.
        writers = [Writer(c.node(1), 100000, 1.0), Writer(c.node(2), 200000, 1.0)]
        for w in writers:
            w.start()
        try:
            fresh.start()
            wait_until(lambda: readyz(fresh)[0] == 200, SLOW_TIMEOUT, "the fresh node ready after catching up")
            assert metric(fresh, "catchup_merges_total") == 1
            fresh.execute("INSERT INTO items VALUES (7000, 'fresh-own', 4)")
            time.sleep(2)
            written = [i for w in writers for i, _ in w.finish()]
            assert written
            dump = c.wait_converged(nodes=[c.node(1), c.node(2), c.node(3), fresh], timeout=SLOW_TIMEOUT)
            rows = {r[0][1]: r[1][1].decode() for r in dump["items"][1]}
            assert rows[7000] == "fresh-own" and rows[1] == dump_n1[1], rows
            assert set(written) <= set(rows), sorted(set(written) - set(rows))[:20]
        finally:
            for w in writers:
                w.stop_flag.set()
            fresh.stop()


class Writer(threading.Thread):
    """An application writing through one long-lived connection, one row per
    transaction, every `pause` seconds, until stopped; remembers what it wrote
    and when (wall clock) each write committed."""

    def __init__(self, node, first_id: int, pause: float):
        super().__init__(daemon=True)
        self.node, self.next_id, self.pause = node, first_id, pause
        self.written: list[tuple[int, float]] = []
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.node.connect() as db:
                while not self.stop_flag.is_set():
                    db.execute("INSERT INTO items VALUES (?, ?, ?)", (self.next_id, f"w-{self.next_id}", self.node.id))
                    db.commit()
                    self.written.append((self.next_id, time.time()))
                    self.next_id += 1
                    self.stop_flag.wait(self.pause)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self) -> list[tuple[int, float]]:
        self.stop_flag.set()
        self.join(60)
        assert self.error is None, f"writer on node {self.node.id}: {self.error!r}"
        return self.written


def log_time(line: str) -> float:
    """The wall-clock time at the start of a console log line."""
    stamp = line.split()[0]
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def test_catch_up_while_every_application_writes(hl_bin, tmp_path):
    """Node 3 merges a snapshot of 60,000 rows it does not have (many batches) while writers run
    on all three nodes, its own included: every row written anywhere, before and during the
    merge, ends on every node, and the dumps are identical."""
    max_entries = 200
    store = tmp_path / "snapshots"
    store.mkdir()
    settings = {"replication_log": {"max_entries": max_entries},
                "snapshot": {"store": "dir", "dir": str(store), "interval": "0"}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=settings, schema=SCHEMA) as c:
        n1, n2, n3 = c.node(1), c.node(2), c.node(3)
        n1.execute("INSERT INTO items VALUES (1, 'first', 1)")
        c.wait_converged()
        time.sleep(1.5)  # node 3 records its position
        n3.stop()
        pos = recorded_seq(n3)
        # In 10,000-row transactions, each waited for: node 2 must read every changeset of the burst
        # before retention (max_entries) discards it, even in a slow (sanitizer) build.
        for lo in range(10000, 70000, 10000):
            db = n1.connect()  # autocommit: without the explicit transaction, 10,000 of them
            with harness.transaction(db):
                db.executemany("INSERT INTO items VALUES (?, ?, 1)", [(i, f"bulk-{i}") for i in range(lo, lo + 10000)])
            db.close()
            c.wait_converged(nodes=[n1, n2], timeout=SLOW_TIMEOUT)
        next_id = roll_streams_past(c, pos, 100, max_entries)
        save_snapshot(n1)
        n3.execute("INSERT INTO items VALUES (5000, 'n3-before', 3)")  # its own, while stopped
        writers = [Writer(n1, 100000, 0.25), Writer(n2, 200000, 0.25), Writer(n3, 300000, 0.005)]
        for w in writers:
            w.start()
        try:
            n3.start()
            wait_until(lambda: readyz(n3)[0] == 200, SLOW_TIMEOUT, "node 3 ready after catching up")
            assert metric(n3, "catchup_merges_total") == 1
            assert metric(n3, "catchup_rows_merged_total") >= 60000
            time.sleep(2)
        finally:
            written = {w.node.id: w.finish() for w in writers}
        log = n3.log_since_start().splitlines()
        began = log_time([line for line in log if "catch-up: merging snapshot" in line][0])
        ended = log_time([line for line in log if "catch-up: merged" in line][0])
        during = [i for i, t in written[3] if began < t < ended]
        assert during, f"no write of node 3's application while it merged ({began:.3f} .. {ended:.3f})"
        dump = c.wait_converged(timeout=SLOW_TIMEOUT)
        ids = {r[0][1] for r in dump["items"][1]}
        for node_id, rows in written.items():
            assert rows, f"node {node_id}'s writer wrote nothing"
            missing = sorted({i for i, _ in rows} - ids)
            assert not missing, f"rows written on node {node_id} missing: {missing[:20]}"
        assert 5000 in ids and set(range(10000, 70000)) <= ids and next_id - 1 in ids


def test_running_node_cut_off_while_the_streams_roll_catches_up(hl_bin, tmp_path):
    """A fourth node keeps running but is cut off from NATS (its only path to the cluster, a
    TCP proxy, is cut: a partition) while the stream rolls past its position. When the path
    heals, its reader finds the stream past what it applied. It must not skip those
    changesets (and give up on their origin's order later): it catches up from the covering
    snapshot and ends identical, with its own writes made meanwhile on every node."""
    store = tmp_path / "snapshots"
    store.mkdir()
    settings = {"replication_log": {"max_entries": MAX_ENTRIES},
                "snapshot": {"store": "dir", "dir": str(store), "interval": "0"}}
    proxy = harness.TcpProxy()
    # The servers tell clients to reach them through the proxy only (nats.server_config is
    # included last): node 4 cannot go around the cut by a server it discovered.
    advertise = tmp_path / "advertise.conf"
    advertise.write_text(f'client_advertise: "127.0.0.1:{proxy.port}"\n')
    cluster_settings = {**settings, "nats": {"server_config": str(advertise)}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=cluster_settings, schema=SCHEMA) as c:
        n1 = c.node(1)
        proxy.target_port = n1.client_port
        n4 = harness.Node(hl_bin, tmp_path / "node4", 4, harness.free_port(), harness.free_port(),
                          harness.free_port(), [], settings=settings, external_urls=[proxy.url])
        n4.executescript(SCHEMA)
        n4.start()
        try:
            for i in range(1, 11):
                n1.execute("INSERT INTO items VALUES (?, ?, 1)", (i, f"first-{i}"))
            nodes = [c.node(1), c.node(2), c.node(3), n4]
            c.wait_converged(nodes=nodes, timeout=SLOW_TIMEOUT)
            time.sleep(1.5)  # node 4 records its position
            pos = recorded_seq(n4)
            assert pos > 0
            proxy.cut()
            n4.execute("INSERT INTO items VALUES (5000, 'n4-own', 4)")  # its application goes on
            next_id = roll_streams_past(c, pos, 100)
            save_snapshot(n1)
            assert metric(n4, "catchup_merges_total") == 0
            proxy.heal()
            wait_until(lambda: metric(n4, "catchup_merges_total") >= 1, SLOW_TIMEOUT,
                       "node 4 catches up from the snapshot once it reaches the stream again")
            n1.execute("INSERT INTO items VALUES (?, 'after', 1)", (next_id,))
            dump = c.wait_converged(nodes=nodes, timeout=SLOW_TIMEOUT)
            wait_until(lambda: readyz(n4)[0] == 200, SLOW_TIMEOUT, "node 4 ready after catching up")
            rows = {r[0][1]: r[1][1].decode() for r in dump["items"][1]}
            assert rows[5000] == "n4-own" and rows[next_id] == "after", rows
            assert metric(n4, "order_gaps_total") == 0, "node 4 gave up on changesets instead of catching up"
            assert "jumped to sequence" in n4.log_since_start()
        finally:
            n4.stop()
            proxy.close()


def test_node_restarting_after_the_stream_emptied_catches_up(hl_bin, tmp_path):
    """Retention by age empties the stream while node 3 is stopped: its first sequence is past
    its last, and past node 3's position. That is a gap like any other: node 3 catches up from
    the snapshot instead of starting ready without the changesets."""
    store = tmp_path / "snapshots"
    store.mkdir()
    # max_age leaves node 1's reader time to come back if its consumer lived on node 3's server
    # (it stalls until its heartbeats are missed): it must read every message before they expire.
    settings = {"replication_log": {"max_age": 20, "duplicate_window": 1},
                "snapshot": {"store": "dir", "dir": str(store), "interval": "0"}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=settings, schema=SCHEMA) as c:
        n1, n3 = c.node(1), c.node(3)
        n1.execute("INSERT INTO items VALUES (1, 'first', 1)")
        c.wait_converged()
        time.sleep(1.5)
        n3.stop()
        n2 = c.node(2)
        for i in range(2, 12):  # node 2 writes: node 1 applies, and records its position as it does
            n2.execute("INSERT INTO items VALUES (?, ?, 2)", (i, f"while-away-{i}"))
        c.wait_converged(nodes=[n1, n2])
        wait_until(lambda: recorded_seq(n1) > recorded_seq(n3) and recorded_seq(n1) >= recorded_seq(n2),
                   REPL_TIMEOUT, "node 1 records its position at the stream's end")
        save_snapshot(n1)
        time.sleep(22)  # every message older than max_age: the stream is empty
        n3.start()
        wait_until(lambda: metric(n3, "catchup_merges_total") >= 1, SLOW_TIMEOUT,
                   "node 3 catches up from the snapshot although the stream is empty")
        dump = c.wait_converged(timeout=SLOW_TIMEOUT)
        assert {r[0][1] for r in dump["items"][1]} == set(range(1, 12))
