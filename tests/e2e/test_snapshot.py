"""Snapshots and bootstrap (docs/snapshots.md): -save-snapshot on a running
cluster, -restore into a fresh fourth node that then joins and converges,
an intact volume that restores nothing, a store with no snapshot, and
corrupted, truncated or bit-flipped snapshots and manifests that are refused
for the next older good one. Every store kind runs the same tests against a
real server (the dir store against the file system)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
from harness import SLOW_TIMEOUT, wait_until

CMD_TIMEOUT = SLOW_TIMEOUT


class DirStore:
    """A snapshot.store: dir; files are where tests can break them."""

    kind = "dir"

    def __init__(self, root: Path):
        self.path = root
        self.path.mkdir(parents=True, exist_ok=True)

    def flags(self) -> list[str]:
        return ["-snapshot-store", "dir", "-snapshot-dir", str(self.path)]

    def env(self) -> dict:
        return {}

    def files(self) -> Path:
        """The directory holding the stored names as files."""
        return self.path

    def clear(self) -> None:
        for p in self.files().iterdir():
            if p.is_file():
                p.unlink()


def run(node: harness.Node, store, *args: str, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs the node's binary with its config, the store's flags and args; returns the result."""
    node.write_config()
    env = dict(os.environ)
    env.update(store.env())
    return subprocess.run(node.argv(*store.flags(), *args), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=node.root)


def save(node: harness.Node, store, *args: str) -> str:
    r = run(node, store, "-save-snapshot", *args)
    assert r.returncode == 0, f"-save-snapshot exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "snapshot saved to" in r.stdout, r.stdout
    manifest = r.stdout.strip().split()[-1]
    assert manifest.endswith(".manifest.json"), r.stdout
    return manifest


def manifests(store) -> list[str]:
    return sorted(p.name for p in store.files().iterdir() if p.name.endswith(".manifest.json"))


def objects(store) -> list[str]:
    return sorted(p.name for p in store.files().iterdir() if p.name.endswith(".db.zst"))


def fresh_node(cluster: harness.Cluster, root: Path, node_id: int = 4) -> harness.Node:
    """A new node joining the cluster through node 1's NATS server, with no database yet."""
    n = harness.Node(cluster.nodes[0].binary, root, node_id, harness.free_port(), harness.free_port(),
                     harness.free_port(), [], external_urls=[cluster.nodes[0].nats_url])
    return n


@pytest.fixture(params=["dir"])
def store(request, tmp_path):
    if request.param == "dir":
        return DirStore(tmp_path / "snapshots")
    raise AssertionError(request.param)


class Writer:
    """Keeps inserting rows on some nodes while a test runs (a busy cluster)."""

    def __init__(self, nodes: list[harness.Node], tag: str):
        self.nodes = nodes
        self.tag = tag
        self.stop_ev = threading.Event()
        self.count = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            i = 0
            while not self.stop_ev.is_set():
                n = self.nodes[i % len(self.nodes)]
                n.execute("INSERT INTO books (title, author, publication_year) VALUES (?, ?, ?)",
                          (f"{self.tag}-{i}", f"writer-{n.id}", 2000 + i % 20))
                i += 1
                self.count = i
                time.sleep(0.01)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_ev.set()
        self.thread.join(30)
        if self.error:
            raise self.error


def test_save_restore_join_converge(cluster, store, tmp_path):
    """A fourth node with no database restores the newest snapshot of a busy
    cluster, joins it and ends with identical dumps; restarting it with its
    volume intact restores nothing."""
    n1 = cluster.node(1)
    for i in range(200):
        n1.execute("INSERT INTO books (title, author, publication_year) VALUES (?, ?, ?)",
                   (f"before-{i}", "snap", 1900 + i % 100))
    n1.execute("DELETE FROM books WHERE title = 'before-7'")  # a tombstone travels in the snapshot
    cluster.wait_converged(["books", "authors"])

    n4 = fresh_node(cluster, tmp_path / "node4")
    with Writer(cluster.nodes[:2], "busy"):
        manifest = save(n1, store)
        assert manifest in manifests(store)
        assert len(objects(store)) == 1
        doc = json.loads((store.files() / manifest).read_text())
        assert doc["format"] == 1 and doc["node"] == "1" and doc["object"] in objects(store)
        assert [s["name"] for s in doc["streams"]] == [harness.STREAM]

        assert not n4.db_path.exists()
        r = run(n4, store, "-restore")
        assert r.returncode == 0, f"-restore exited {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert "restored" in r.stdout, r.stdout
        assert n4.db_path.exists()
        # the capture machinery of node 1 is gone, its replicated state is there
        names = {row[0] for row in n4.query("SELECT name FROM sqlite_schema")}
        assert not any(nm.endswith("_change_log") for nm in names), names
        assert n4.scalar("SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'") == 0
        assert n4.scalar("SELECT count(*) FROM __harmonylite__outbox") == 0
        assert n4.scalar("SELECT count(*) FROM __harmonylite__meta WHERE key IN ('node_id', 'epoch')") == 0
        assert n4.scalar("SELECT count(*) FROM __harmonylite__books_clock WHERE deleted = 1") >= 1
        assert n4.scalar("SELECT seq FROM __harmonylite__seq WHERE stream = ?", (harness.STREAM,)) > 0
        assert n4.scalar("SELECT count(*) FROM books WHERE title = 'before-199'") == 1
        n4.start()
        cluster.wait_for_triggers(["books", "authors"], [n4])
    # the new node's own writes reach everyone, and everyone's reach it
    n4.execute("INSERT INTO books (title, author, publication_year) VALUES ('from-4', 'node4', 2024)")
    n1.execute("UPDATE books SET publication_year = 1111 WHERE title = 'before-3'")
    everyone = cluster.nodes + [n4]
    try:
        cluster.wait_converged(["books", "authors"], nodes=everyone)
        titles = {row[0] for row in n4.query("SELECT title FROM books")}
        assert "from-4" in titles and "before-7" not in titles and "busy-0" in titles
    finally:
        n4.stop()

    # restart with the volume intact: nothing restored, nothing replaced
    ino = n4.db_path.stat().st_ino
    before = n4.dump(["books"])
    r = run(n4, store, "-restore")
    assert r.returncode == 0, r.stderr
    assert "has data" in r.stdout and "no restore" in r.stdout, r.stdout
    assert n4.db_path.stat().st_ino == ino and n4.dump(["books"]) == before


def test_restore_without_snapshot_starts_empty(cluster, store, tmp_path):
    """A brand-new cluster has no snapshot: -restore exits 0 and leaves nothing."""
    n = fresh_node(cluster, tmp_path / "node5", 5)
    r = run(n, store, "-restore")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "no snapshot" in r.stdout, r.stdout
    assert not n.db_path.exists()


def _flip(p: Path, at: int) -> None:
    b = bytearray(p.read_bytes())
    b[at % len(b)] ^= 0x10
    p.write_bytes(bytes(b))


def test_bad_snapshots_are_refused_for_older_good_one(cluster, store, tmp_path):
    """Corrupted, truncated, bit-flipped objects and broken manifests are refused
    with a reason and the newest good older snapshot is restored; when none
    verifies, -restore fails and creates nothing."""
    n1 = cluster.node(1)
    n1.execute("INSERT INTO books (title, author, publication_year) VALUES ('gen-0', 'snap', 1)")
    cluster.wait_converged(["books"])
    good = save(n1, store, "-snapshot-keep", "10")
    good_count = n1.scalar("SELECT count(*) FROM books")
    bad = []
    for i in range(1, 5):
        n1.execute("INSERT INTO books (title, author, publication_year) VALUES (?, 'snap', 1)", (f"gen-{i}",))
        bad.append(save(n1, store, "-snapshot-keep", "10"))
        time.sleep(0.01)  # names sort by millisecond
    files = store.files()
    obj = lambda m: m.replace(".manifest.json", ".db.zst")  # noqa: E731
    _flip(files / obj(bad[0]), 5000)                             # a bit flipped in the object
    data = (files / obj(bad[1])).read_bytes()
    (files / obj(bad[1])).write_bytes(data[: len(data) // 2])    # truncated object
    (files / bad[2]).write_text((files / bad[2]).read_text()[:-20])  # truncated manifest
    doc = json.loads((files / bad[3]).read_text())
    doc["object"] = "../../etc/passwd"                           # a name from the network
    (files / bad[3]).write_text(json.dumps(doc))

    n = fresh_node(cluster, tmp_path / "node6", 6)
    r = run(n, store, "-restore")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert good in r.stdout, r.stdout
    log = r.stdout + r.stderr
    assert log.count("snapshot refused") == 4, log
    assert "SHA-256" in log or "decompression failed" in log, log
    assert "manifest: not a JSON object" in log and "object: expected a name" in log, log
    assert n.scalar("SELECT count(*) FROM books") == good_count
    assert n.scalar("PRAGMA integrity_check") == "ok"

    # -force replaces a database with data; without it nothing happens
    n.execute("INSERT INTO books (title, author, publication_year) VALUES ('local', 'x', 1)")
    r = run(n, store, "-restore")
    assert r.returncode == 0 and "has data" in r.stdout
    assert n.scalar("SELECT count(*) FROM books WHERE title = 'local'") == 1
    r = run(n, store, "-restore", "-force")
    assert r.returncode == 0, r.stderr
    assert n.scalar("SELECT count(*) FROM books WHERE title = 'local'") == 0

    # nothing verifies: an error, and no database appears
    _flip(files / obj(good), 3000)
    m = fresh_node(cluster, tmp_path / "node7", 7)
    r = run(m, store, "-restore")
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "none of the 5 snapshots" in r.stderr, r.stderr
    assert not m.db_path.exists()
    assert not [p for p in m.root.iterdir() if ".restore-" in p.name]


def test_keep_newest(cluster, store):
    """snapshot.keep: older snapshots (manifest and object) are removed."""
    n1 = cluster.node(1)
    made = [save(n1, store) for _ in range(4)]
    assert manifests(store) == sorted(made)[-3:]
    assert objects(store) == sorted(m.replace(".manifest.json", ".db.zst") for m in made)[-3:]
    r = run(n1, store, "-save-snapshot", "-snapshot-keep", "1")
    assert r.returncode == 0, r.stderr
    assert len(manifests(store)) == 1 and len(objects(store)) == 1


def test_save_without_harmonylite_state_fails(tmp_path, hl_bin):
    """A database harmonylite never ran on cannot be snapshotted: a clear error, exit 1."""
    db = tmp_path / "plain.db"
    harness.execute(db, "CREATE TABLE t (id INTEGER PRIMARY KEY)")
    snaps = tmp_path / "s"
    snaps.mkdir()
    r = subprocess.run([str(hl_bin), "-db-path", str(db), "-node-id", "1", "-snapshot-store", "dir",
                        "-snapshot-dir", str(snaps), "-save-snapshot"], capture_output=True, text=True,
                       timeout=CMD_TIMEOUT)
    assert r.returncode == 1 and "no harmonylite state" in r.stderr, r.stderr
    assert list(snaps.iterdir()) == [] and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    r = subprocess.run([str(hl_bin), "-db-path", str(db), "-node-id", "1", "-snapshot-store", "dir",
                        "-save-snapshot"], capture_output=True, text=True, timeout=CMD_TIMEOUT)
    assert r.returncode == 2 and "snapshot.dir: expected" in r.stderr, r.stderr
