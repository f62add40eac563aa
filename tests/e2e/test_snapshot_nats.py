"""The nats snapshot store (docs/snapshots.md, "The nats store"): snapshots in a NATS object
store, in the layout the nats CLI (natscli) and nats.go use. harmonylite puts a snapshot and the
nats CLI reads it back byte-exact; the nats CLI puts one and harmonylite restores from it; a
tampered object is refused; snapshot.keep holds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import harness
from harness import SLOW_TIMEOUT

BUCKET = "hl-snaps"
FLAGS = ["-snapshot-store", "nats", "-snapshot-nats-bucket", BUCKET]
LOCATION = f"nats://object-store/{BUCKET}/"


@pytest.fixture(scope="module")
def natscli() -> str:
    script = Path(__file__).resolve().parents[2] / "scripts" / "install-go-tools.sh"
    # Under CI the tool must be had (the project's scripts install it): a skip there would hide
    # a broken install step. Elsewhere (no network, say) the tests skip, saying why.
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    try:
        r = subprocess.run(["bash", str(script), "nats"], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        missing(f"the nats CLI could not be built: {e}")
    if r.returncode != 0:
        missing(f"scripts/install-go-tools.sh nats failed: {r.stderr.strip()[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cluster(hl_bin, tmp_path_factory):
    with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("natsstore"), size=3) as c:
        n1 = c.nodes[0]
        # About 1 MiB compressed: several 128 KiB chunks.
        with n1.connect() as db:
            db.executemany("INSERT INTO books (id, title, author, publication_year) VALUES (?, hex(randomblob(400)), "
                           "'a', 2000)", [(i,) for i in range(500001, 503001)])
            db.commit()
        harness.wait_equal(lambda: c.nodes[2].scalar("SELECT count(*) FROM books WHERE id > 500000"), 3000, SLOW_TIMEOUT,
                           "rows replicated")
        yield c


def hl(node: harness.Node, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    node.write_config()
    return subprocess.run(node.argv(*FLAGS, *args), capture_output=True, text=True, timeout=SLOW_TIMEOUT,
                          env={**os.environ, **(env or {})}, cwd=node.root)


def save(node: harness.Node) -> str:
    r = hl(node, "-save-snapshot")
    assert r.returncode == 0, f"-save-snapshot exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    where = r.stdout.strip().split()[-1]
    assert where.startswith(LOCATION) and where.endswith(".manifest.json"), r.stdout
    return where[len(LOCATION):]


def cli(natscli: str, node: harness.Node, *args: str) -> str:
    r = subprocess.run([natscli, "-s", node.nats_url, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"nats {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def names(natscli: str, node: harness.Node) -> list[str]:
    out = cli(natscli, node, "object", "ls", BUCKET, "--names")
    return sorted(line.strip() for line in out.splitlines() if line.strip().startswith("snap-"))


def fresh(cluster: harness.Cluster, root: Path) -> harness.Node:
    """A fifth node's files, reaching node 1's server (a restore needs a reachable NATS)."""
    return harness.Node(cluster.nodes[0].binary, root, 5, harness.free_port(), harness.free_port(),
                        harness.free_port(), [], external_urls=[cluster.nodes[0].nats_url])


def test_harmonylite_puts_the_nats_cli_reads(cluster, natscli, tmp_path):
    n1 = cluster.nodes[0]
    manifest = save(n1)
    obj = manifest.replace(".manifest.json", ".db.zst")
    assert {manifest, obj} <= set(names(natscli, n1))
    cli(natscli, n1, "object", "get", BUCKET, manifest, "-O", str(tmp_path / "m.json"), "--force")
    cli(natscli, n1, "object", "get", BUCKET, obj, "-O", str(tmp_path / "o.zst"), "--force")
    m = json.loads((tmp_path / "m.json").read_text())
    data = (tmp_path / "o.zst").read_bytes()
    assert len(data) == int(m["size"]) > 3 * 128 * 1024, "expected an object of several chunks"
    assert hashlib.sha256(data).hexdigest() == m["sha256"]
    # The stream is the one the nats CLI would have made.
    info = json.loads(cli(natscli, n1, "stream", "info", f"OBJ_{BUCKET}", "--json"))
    assert info["config"]["allow_rollup_hdrs"] is True and info["config"]["discard"] == "new"


def test_the_nats_cli_puts_harmonylite_restores(cluster, natscli, tmp_path):
    n1 = cluster.nodes[0]
    manifest = save(n1)
    obj = manifest.replace(".manifest.json", ".db.zst")
    for name in (obj, manifest):
        cli(natscli, n1, "object", "get", BUCKET, name, "-O", str(tmp_path / name), "--force")
    # Every snapshot removed, then this one put back by the nats CLI alone.
    for name in names(natscli, n1):
        cli(natscli, n1, "object", "rm", BUCKET, name, "--force")
    assert names(natscli, n1) == []
    for name in (obj, manifest):
        cli(natscli, n1, "object", "put", BUCKET, str(tmp_path / name), "--name", name, "--force")
    node = fresh(cluster, tmp_path / "n5")
    r = hl(node, "-restore")
    assert r.returncode == 0, f"-restore exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert manifest in r.stdout + r.stderr
    assert node.scalar("SELECT count(*) FROM books WHERE id > 500000") == 3000
    assert node.scalar("SELECT sum(length(title)) FROM books") == n1.scalar("SELECT sum(length(title)) FROM books")


def test_a_tampered_object_is_refused_for_an_older_good_one(cluster, natscli, tmp_path):
    n1 = cluster.nodes[0]
    good = save(n1)
    bad = save(n1)
    # The newer object replaced (through the nats CLI) by other bytes: its
    # digest in the bucket is right, the manifest's SHA-256 is not.
    evil = tmp_path / "evil"
    evil.write_bytes(os.urandom(4096))
    cli(natscli, n1, "object", "put", BUCKET, str(evil), "--name", bad.replace(".manifest.json", ".db.zst"),
        "--force")
    node = fresh(cluster, tmp_path / "n5")
    r = hl(node, "-restore")
    assert r.returncode == 0, f"-restore exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    out = r.stdout + r.stderr
    assert bad in out and good in out, out
    assert node.scalar("SELECT count(*) FROM books WHERE id > 500000") == 3000


def test_keep_removes_older_snapshots(cluster, natscli):
    n1 = cluster.nodes[0]
    made = [save(n1) for _ in range(4)]
    left = [n for n in names(natscli, n1) if n.endswith(".manifest.json")]
    assert left == sorted(made)[-3:], left
    assert len([n for n in names(natscli, n1) if n.endswith(".db.zst")]) == 3


def test_no_server_is_a_clear_error(cluster, tmp_path):
    node = harness.Node(cluster.nodes[0].binary, tmp_path / "n6", 6, harness.free_port(), harness.free_port(),
                        harness.free_port(), [], external_urls=[f"nats://127.0.0.1:{harness.free_port()}"])
    node.settings["nats"]["connect_retries"] = 0
    r = hl(node, "-save-snapshot")
    assert r.returncode != 0
    assert "nats store: cannot reach NATS" in r.stderr, r.stderr
