"""Periodic snapshots from the running nodes (docs/snapshots.md#periodic-snapshots):
one node at a time under the lease in NATS KV, never two closer than
snapshot.interval (read from the manifests), snapshot.keep honoured, metrics,
/readyz and /schema; a lease holder killed with SIGKILL while it takes a
snapshot blocks the others only until its lease expires; sleep_timeout takes a
snapshot and exits 0."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import harness
from harness import SLOW_TIMEOUT, wait_until

INTERVAL_MS = 2000
KEEP = 3
BUCKET = "harmonylite-snapshot"


def _get(node: harness.Node, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(node.http_url + path, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:  # /readyz answers 503 with a body
        return e.code, e.read().decode()


def metrics(node: harness.Node) -> dict[str, float]:
    """Samples of the harmonylite_snapshot* metrics, by name (node_id is the only label)."""
    _, text = _get(node, "/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith("harmonylite_snapshot"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


class Watcher:
    """Reads every manifest that appears in the store, before pruning can remove it."""

    def __init__(self, store: Path):
        self.store = store
        self.seen: dict[str, dict] = {}
        self.most_at_once = 0
        self.stop_ev = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _scan(self) -> None:
        names = [p.name for p in self.store.iterdir() if p.name.endswith(".manifest.json")]
        self.most_at_once = max(self.most_at_once, len(names))
        for n in names:
            if n not in self.seen:
                try:
                    self.seen[n] = json.loads((self.store / n).read_text())
                except FileNotFoundError:  # pruned between listing and reading: seen by its successor's gap
                    pass

    def _run(self) -> None:
        try:
            while not self.stop_ev.is_set():
                self._scan()
                time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def __enter__(self) -> "Watcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_ev.set()
        self.thread.join(30)
        if self.error:
            raise self.error

    def by_time(self) -> list[tuple[int, int, str]]:
        """(created_ms, node, name) of every manifest seen, oldest first."""
        return sorted((int(d["created_ms"]), int(d["node"]), n) for n, d in dict(self.seen).items())


class HangingServer:
    """Accepts connections and never answers: a store whose upload hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def kv_get(node: harness.Node, key: str) -> dict | None:
    """The JSON value of key in the lease bucket, through node's NATS server; None when absent."""
    from nats.js.errors import KeyNotFoundError

    async def fn(nc, js):
        kv = await js.key_value(BUCKET)
        try:
            e = await kv.get(key)
        except KeyNotFoundError:
            return None
        return json.loads(e.value) if e.value else None

    return harness.run_nats(node.nats_url, fn)


@pytest.fixture(scope="module")
def sched_cluster(hl_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    store = root / "snapshots"
    store.mkdir()
    settings = {"snapshot": {"store": "dir", "dir": str(store), "keep": KEEP, "interval": f"{INTERVAL_MS}ms"}}
    with harness.started_cluster(hl_bin, root, settings=settings) as c:
        c.store = store
        for n in c.nodes:  # each node's own, so that changing one node's store changes no other's
            n.settings["snapshot"] = dict(n.settings["snapshot"])
        yield c


def test_periodic_one_node_at_a_time(sched_cluster):
    c = sched_cluster
    c.node(1).execute("INSERT INTO books (title, author, publication_year) VALUES ('periodic', 'a', 2001)")
    c.wait_converged(["books"])
    with Watcher(c.store) as w:
        wait_until(lambda: len(w.seen) >= 6, SLOW_TIMEOUT, "six periodic snapshots in the store")
        first = {n.id: metrics(n) for n in c.nodes}
        wait_until(lambda: len(w.seen) >= 8, SLOW_TIMEOUT, "two more periodic snapshots")
    taken = w.by_time()
    # one at a time, cluster-wide: never two closer than the interval, whichever node took them
    for (t0, n0, a), (t1, n1, b) in zip(taken, taken[1:]):
        assert t1 - t0 >= INTERVAL_MS, f"{a} (node {n0}) and {b} (node {n1}) are {t1 - t0} ms apart"
    assert {n for _, n, _ in taken} <= {1, 2, 3}
    # keep: at most one more than keep while the newest is stored and the oldest not yet removed
    assert w.most_at_once <= KEEP + 1, w.most_at_once
    wait_until(lambda: len(list(c.store.glob("*.manifest.json"))) == KEEP
               and len(list(c.store.glob("*.db.zst"))) == KEEP, SLOW_TIMEOUT, f"{KEEP} snapshots kept")

    # metrics: every node knows the newest snapshot; the takers count theirs
    later = {n.id: metrics(n) for n in c.nodes}
    for nid, m in later.items():
        for name in ("harmonylite_snapshots_taken_total", "harmonylite_snapshot_failures_total",
                     "harmonylite_snapshot_last_size_bytes", "harmonylite_snapshot_last_duration_seconds",
                     "harmonylite_snapshot_age_seconds"):
            assert name in m, (nid, name, m)
        assert m["harmonylite_snapshot_failures_total"] == 0, (nid, m)
        assert m["harmonylite_snapshot_age_seconds"] < SLOW_TIMEOUT
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    undocumented = [name for m in later.values() for name in m if f"`{name}`" not in doc]
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"
    total = sum(m["harmonylite_snapshots_taken_total"] for m in later.values())
    assert total >= 8 and total > sum(m.get("harmonylite_snapshots_taken_total", 0) for m in first.values())
    for nid, m in later.items():
        if m["harmonylite_snapshots_taken_total"]:
            assert m["harmonylite_snapshot_last_size_bytes"] > 0 and m["harmonylite_snapshot_last_duration_seconds"] > 0

    # /readyz and /schema name the newest snapshot the node knows of
    names = set(w.seen)
    for n in c.nodes:
        code, body = _get(n, "/readyz")
        assert code == 200, body
        snap = json.loads(body)["snapshot"]
        assert snap["manifest"] in names and snap["node"] in (1, 2, 3) and snap["created"].endswith("Z"), snap
        _, body = _get(n, "/schema")
        assert json.loads(body)["snapshot"]["manifest"] in names


def test_killed_lease_holder_blocks_only_until_expiry(sched_cluster):
    """Node 1's store hangs, so once it wins the lease it holds it, renewing,
    inside its upload. SIGKILL: no renewal; another node takes the next
    snapshot, after the lease's expiry and not before."""
    c = sched_cluster
    n1 = c.node(1)
    hang = HangingServer()
    try:
        n1.restart({"snapshot": {"store": "s3", "s3_endpoint": f"http://127.0.0.1:{hang.port}",
                                 "s3_bucket": "hangs", "s3_path_style": True,
                                 "s3_access_key": "AKIAHANGING", "s3_secret_key": "hanging-secret"}})

        def node1_holds() -> bool:
            lease = kv_get(c.node(2), "lease")
            return bool(lease) and lease["node"] == "1" and int(lease["expires_ms"]) > time.time() * 1000

        wait_until(node1_holds, SLOW_TIMEOUT, "node 1 holding the snapshot lease inside its hanging upload")
        n1.kill()
        killed_ms = time.time() * 1000
        lease = kv_get(c.node(2), "lease")
        assert lease["node"] == "1", lease
        expires = int(lease["expires_ms"])
        with Watcher(c.store) as w:
            wait_until(lambda: any(t > killed_ms for t, _, _ in w.by_time()), SLOW_TIMEOUT,
                       "a snapshot by another node after node 1's death")
        after = [(t, nid, name) for t, nid, name in w.by_time() if t > killed_ms]
        t, nid, name = after[0]
        assert nid in (2, 3), after
        assert t >= expires, f"{name} taken at {t}, before node 1's lease expired at {expires}"
        assert "hanging-secret" not in n1.log_path.read_text()
    finally:
        hang.close()
        n1.settings["snapshot"] = {"store": "dir", "dir": str(c.store), "keep": KEEP, "interval": "0"}
        n1.start()


def test_sigterm_does_not_wait_for_a_hanging_store(sched_cluster):
    """A node stopped while its snapshot upload hangs stops gracefully (exit 0, within the
    harness's stop timeout) instead of waiting out the store's stall timeout and retries."""
    c = sched_cluster
    n1 = c.node(1)
    hang = HangingServer()
    try:
        n1.restart({"snapshot": {"store": "s3", "s3_endpoint": f"http://127.0.0.1:{hang.port}",
                                 "s3_bucket": "hangs", "s3_path_style": True, "interval": f"{INTERVAL_MS}ms",
                                 "s3_access_key": "AKIAHANGING", "s3_secret_key": "hanging-secret"}})
        wait_until(lambda: "taking a snapshot under the lease" in n1.log_since_start(), SLOW_TIMEOUT,
                   "node 1 taking a snapshot into the hanging store")
        n1.stop()  # asserts exit status 0 within the stop timeout and no child left
        assert "hanging-secret" not in n1.log_path.read_text()
    finally:
        hang.close()
        n1.settings["snapshot"] = {"store": "dir", "dir": str(c.store), "keep": KEEP, "interval": "0"}
        if not n1.running:
            n1.start()


def test_sleep_timeout_snapshots_and_exits_0(sched_cluster):
    c = sched_cluster
    n1, n2, n3 = c.nodes
    for n in (n1, n3):  # no periodic snapshot may stand in for the one sleep_timeout takes
        if n.settings["snapshot"]["interval"] != "0":
            n.restart({"snapshot": {"interval": "0"}})
    n2.restart({"snapshot": {"interval": "0"}, "sleep_timeout": "4s"})
    n1.execute("INSERT INTO books (title, author, publication_year) VALUES ('before-sleep', 'b', 2002)")
    wait_until(lambda: n2.scalar("SELECT count(*) FROM books WHERE title = 'before-sleep'") == 1, SLOW_TIMEOUT,
               "the row on node 2")
    changed_ms = time.time() * 1000
    wait_until(lambda: not n2.running, SLOW_TIMEOUT, "node 2 exiting after sleep_timeout")
    n2.expected_running = False
    assert n2.proc.returncode == 0, n2.log_tail()
    mine = [json.loads(p.read_text()) for p in c.store.glob("*.manifest.json")]
    mine = [d for d in mine if d["node"] == "2" and int(d["created_ms"]) >= changed_ms - 1000]
    assert mine, n2.log_tail()
    assert "sleep_timeout" in n2.log_since_start()


def test_first_snapshot_of_a_new_cluster_is_prompt(hl_bin, tmp_path):
    """"The first one of a new cluster is due at once": not a quarter interval (here 30 s, the
    longest tick) after the nodes start, but as soon as one of them is caught up."""
    store = tmp_path / "snapshots"
    store.mkdir()
    settings = {"snapshot": {"store": "dir", "dir": str(store), "interval": "1h"}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=settings):
        wait_until(lambda: len(list(store.glob("*.manifest.json"))) == 1, 15, "the first snapshot within 15 s")


def test_early_when_a_stream_advanced_its_retention_share(hl_bin, tmp_path):
    """With the interval still far away, a stream that advanced snapshot.retention_percent
    of replication_log.max_entries past the last snapshot gets one early."""
    store = tmp_path / "snapshots"
    store.mkdir()
    # 40 s: a tick of 10 s, so that the test waits little, and an interval the early one comes well
    # before (the log line below shows the retention share was the reason)
    settings = {"replication_log": {"max_entries": 40},
                "snapshot": {"store": "dir", "dir": str(store), "interval": "40s", "retention_percent": 25}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=settings) as c:
        # the cluster's first snapshot is due at once
        wait_until(lambda: len(list(store.glob("*.manifest.json"))) == 1, SLOW_TIMEOUT, "the first snapshot")
        first = json.loads(next(store.glob("*.manifest.json")).read_text())
        for i in range(12):  # 12 changesets (each waits for the one before: no coalescing): past 25% of 40
            c.node(1).execute("INSERT INTO books (title, author, publication_year) VALUES (?, 'r', 2003)",
                              (f"share-{i}",))
            wait_until(lambda: c.node(2).scalar("SELECT count(*) FROM books WHERE title = ?", (f"share-{i}",)) == 1,
                       SLOW_TIMEOUT, f"share-{i} on node 2")
        wait_until(lambda: len(list(store.glob("*.manifest.json"))) == 2, SLOW_TIMEOUT,
                   "a second snapshot long before the interval")
        docs = sorted((json.loads(p.read_text()) for p in store.glob("*.manifest.json")),
                      key=lambda d: int(d["created_ms"]))
        assert docs[0]["object"] == first["object"]
        def seq(d):  # a stream this node never applied from is not in the manifest: position 0
            return int(d["streams"][0]["seq"]) if d["streams"] else 0

        assert seq(docs[1]) - seq(first) >= 10, docs
        assert any("retention share" in n.log_since_start() for n in c.nodes)

        # whoever can write to the bucket cannot stop snapshots with a record from the future
        # (or garbage): it is not believed, and the next snapshot replaces it
        forged = {"node": "9", "created_ms": str(int(time.time() * 1000) + 10 * 3600 * 1000), "size": "1",
                  "manifest": "snap-forged.manifest.json", "streams": []}
        for value in (json.dumps(forged).encode(), b"garbage"):
            before = {p.name for p in store.glob("*.manifest.json")}

            async def put(nc, js, value=value):
                kv = await js.key_value(BUCKET)
                await kv.put("last", value)

            harness.run_nats(c.node(1).nats_url, put)
            wait_until(lambda: {p.name for p in store.glob("*.manifest.json")} - before, SLOW_TIMEOUT,
                       "a snapshot replacing the forged record")
            wait_until(lambda: (kv_get(c.node(1), "last") or {}).get("node") in ("1", "2", "3"), SLOW_TIMEOUT,
                       "the forged record replaced")


def test_save_snapshot_counts_as_the_clusters_last(hl_bin, tmp_path):
    """-save-snapshot records its snapshot in the lease bucket: the schedulers count their
    interval from it (no periodic one right after) and /readyz shows it as the newest."""
    store = tmp_path / "snapshots"
    store.mkdir()
    # the schedulers look at the bucket every quarter interval (10 s); none is due again within the test
    settings = {"snapshot": {"store": "dir", "dir": str(store), "interval": "40s"}}
    with harness.started_cluster(hl_bin, tmp_path / "c", settings=settings) as c:
        wait_until(lambda: len(list(store.glob("*.manifest.json"))) == 1, SLOW_TIMEOUT, "the first snapshot")
        wait_until(lambda: kv_get(c.node(1), "last") is not None, SLOW_TIMEOUT, "the first one recorded")
        n2 = c.node(2)
        n2.write_config()
        r = subprocess.run(n2.argv("-save-snapshot"), capture_output=True, text=True, timeout=SLOW_TIMEOUT,
                           cwd=n2.root)
        assert r.returncode == 0, r.stdout + r.stderr
        newest = max(store.glob("*.manifest.json"), key=lambda p: int(json.loads(p.read_text())["created_ms"]))
        assert "-n2-" in newest.name
        last = kv_get(c.node(1), "last")
        assert last["manifest"] == newest.name and last["node"] == "2", last

        def shown(n):
            code, body = _get(n, "/readyz")
            return (json.loads(body).get("snapshot") or {}).get("manifest") == newest.name

        wait_until(lambda: all(shown(n) for n in c.nodes), SLOW_TIMEOUT, "every node shows it on /readyz")
        assert len(list(store.glob("*.manifest.json"))) == 2
