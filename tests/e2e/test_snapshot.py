"""Snapshots and bootstrap (docs/snapshots.md): -save-snapshot on a running
cluster, -restore into a fresh fourth node that then joins and converges,
an intact volume that restores nothing, a store with no snapshot, and
corrupted, truncated or bit-flipped snapshots and manifests that are refused
for the next older good one. Every store kind runs the same tests against a
real server (the dir store against the file system)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
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

    def location(self) -> str:
        """How harmonylite names the store in what it prints."""
        return str(self.path) + "/"

    def files(self) -> Path:
        """The directory holding the stored names as files."""
        return self.path


class S3Server:
    """A real S3 server: versitygw with its posix backend, built by
    scripts/install-s3-server.sh, on a loopback port. Objects are plain files
    under root/<bucket>/<key>, where tests can break them."""

    ACCESS = "AKIAHARMONYLITETEST"
    SECRET = "hl-test-secret-Zm9vYmFy"

    def __init__(self, binary: Path, root: Path, extra: tuple[str, ...] = (), port: int | None = None):
        self.root = root / "s3root"
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)  # the bucket
        self.port = port or harness.free_port()
        self.log = open(root / "versitygw.log", "ab")
        self.proc = subprocess.Popen([str(binary), "--access", self.ACCESS, "--secret", self.SECRET,
                                      "--port", f"127.0.0.1:{self.port}", "--quiet", *extra, "posix", str(self.root)],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        import socket

        def listening() -> bool:
            assert self.proc.poll() is None, f"versitygw exited: see {root / 'versitygw.log'}"
            with socket.socket() as sk:
                return sk.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 60, "versitygw listening")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        self.log.close()


class S3Store:
    """A snapshot.store: s3 under a prefix of its own on the shared server;
    credentials come from the standard AWS_* environment."""

    kind = "s3"
    counter = 0

    def __init__(self, server: S3Server, part_size: int = 5 << 20):
        S3Store.counter += 1
        self.server = server
        self.prefix = f"cluster-{S3Store.counter}/"
        self.part_size = part_size

    def flags(self) -> list[str]:
        return ["-snapshot-store", "s3", "-snapshot-s3-endpoint", self.server.endpoint,
                "-snapshot-s3-bucket", "snapshots", "-snapshot-s3-path-style", "true",
                "-snapshot-s3-prefix", self.prefix, "-snapshot-s3-part-size", str(self.part_size)]

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": S3Server.ACCESS, "AWS_SECRET_ACCESS_KEY": S3Server.SECRET,
                "AWS_REGION": "us-east-1"}

    def location(self) -> str:
        return f"s3://snapshots/{self.prefix}"

    def files(self) -> Path:
        return self.server.root / "snapshots" / self.prefix.rstrip("/")


def _s3_binary() -> tuple[Path | None, str]:
    """Builds (once, cached) or finds the S3 server; (None, why) when it cannot be had."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "install-s3-server.sh"
    try:
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"scripts/install-s3-server.sh could not run: {e}"
    if r.returncode != 0:
        return None, f"scripts/install-s3-server.sh failed: {r.stderr.strip()[-2000:]}"
    return Path(r.stdout.strip().splitlines()[-1]), ""


@pytest.fixture(scope="session")
def s3_binary() -> Path:
    binary, why = _s3_binary()
    if binary is None:
        pytest.skip(f"no S3 server to test against: {why}")
    return binary


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    binary, why = _s3_binary()
    if binary is None:
        pytest.skip(f"no S3 server to test against: {why}")
    server = S3Server(binary, tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


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
    where = r.stdout.strip().split()[-1]
    assert where.startswith(store.location()) and where.endswith(".manifest.json"), r.stdout
    return where[len(store.location()):]


def _names(store) -> list[str]:
    d = store.files()
    return [p.name for p in d.iterdir() if p.is_file()] if d.is_dir() else []


def manifests(store) -> list[str]:
    return sorted(n for n in _names(store) if n.endswith(".manifest.json"))


def objects(store) -> list[str]:
    return sorted(n for n in _names(store) if n.endswith(".db.zst"))


def fresh_node(cluster: harness.Cluster, root: Path, node_id: int = 4) -> harness.Node:
    """A new node joining the cluster through node 1's NATS server, with no database yet."""
    n = harness.Node(cluster.nodes[0].binary, root, node_id, harness.free_port(), harness.free_port(),
                     harness.free_port(), [], external_urls=[cluster.nodes[0].nats_url])
    return n


class SftpServer:
    """A real SSH server: OpenSSH's sshd on a loopback port, with host and
    client keys of its own, serving SFTP from the local file system."""

    PHRASE = "key-phrase-Zm9v"

    def __init__(self, root: Path):
        self.root = root
        self.port = harness.free_port()
        # ed25519 for the login: Debian 12's libssh2 1.10 leaks a few bytes per login with an ECDSA
        # key (LeakSanitizer fails the ASan run); an ECDSA host key exercises the other key type.
        for key, kind, phrase in (("hostkey", "ecdsa", ""), ("clientkey", "ed25519", ""), ("otherkey", "ecdsa", ""),
                                  ("phrasekey", "ed25519", self.PHRASE)):
            subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", phrase, "-f", str(root / key)], check=True)
        (root / "authorized_keys").write_text((root / "clientkey.pub").read_text() +
                                              (root / "phrasekey.pub").read_text())
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {(root / 'hostkey.pub').read_text()}")
        self.wrong_known_hosts = root / "wrong_known_hosts"
        self.wrong_known_hosts.write_text(f"[127.0.0.1]:{self.port} {(root / 'otherkey.pub').read_text()}")
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root / 'hostkey'}\nPidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n")
        self.log = open(root / "sshd.log", "ab")
        self.proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f",
                                      str(root / "sshd_config")], stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        import socket

        def listening() -> bool:
            assert self.proc.poll() is None, f"sshd exited: {(root / 'sshd.log').read_text()[-2000:]}"
            with socket.socket() as sk:
                return sk.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 30, "sshd listening")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        self.log.close()


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory):
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    if not sshd or not shutil.which("ssh-keygen"):
        pytest.skip("no OpenSSH server to test against: install openssh-server (scripts/install-deps.sh does)")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    server = SftpServer(tmp_path_factory.mktemp("sftp"))
    yield server
    server.stop()


class SftpStore:
    """A snapshot.store: sftp, in a directory of its own on the shared server."""

    kind = "sftp"
    counter = 0

    def __init__(self, server: SftpServer):
        SftpStore.counter += 1
        self.server = server
        self.path = server.root / f"snapshots-{SftpStore.counter}"
        self.path.mkdir()

    def flags(self) -> list[str]:
        return ["-snapshot-store", "sftp", "-snapshot-sftp-url", f"sftp://127.0.0.1:{self.server.port}{self.path}",
                "-snapshot-sftp-key-file", str(self.server.root / "clientkey"),
                "-snapshot-sftp-known-hosts", str(self.server.known_hosts)]

    def env(self) -> dict:
        return {}

    def location(self) -> str:
        return f"sftp://127.0.0.1:{self.server.port}{self.path}/"

    def files(self) -> Path:
        return self.path


DAV_MODULE = Path("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so")


class WebdavServer:
    """A real WebDAV server: nginx with its dav module (PUT, DELETE, MOVE) and
    the dav-ext module (PROPFIND), basic authentication, on a loopback port."""

    USER = "hl"
    PASSWORD = "dav-secret-Zm9v"

    def __init__(self, root: Path):
        self.root = root
        self.port = harness.free_port()
        (root / "www").mkdir()
        (root / "tmp").mkdir()
        hashed = subprocess.run(["openssl", "passwd", "-apr1", self.PASSWORD], capture_output=True, text=True,
                                check=True).stdout.strip()
        (root / "htpasswd").write_text(f"{self.USER}:{hashed}\n")
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's private directories
        (root / "nginx.conf").write_text(
            f"daemon off;\n{user}pid {root / 'nginx.pid'};\nerror_log {root / 'error.log'};\n"
            f"load_module {DAV_MODULE};\nevents {{}}\nhttp {{\n  access_log off;\n"
            f"  client_body_temp_path {root / 'tmp'};\n  server {{\n    listen 127.0.0.1:{self.port};\n"
            f"    root {root / 'www'};\n    location / {{\n      dav_methods PUT DELETE MKCOL COPY MOVE;\n"
            "      dav_ext_methods PROPFIND OPTIONS;\n      client_max_body_size 0;\n"
            f"      auth_basic harmonylite;\n      auth_basic_user_file {root / 'htpasswd'};\n    }}\n  }}\n}}\n")
        self.log = open(root / "nginx.log", "ab")
        self.proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(root / "nginx.conf"),
                                      "-p", str(root)], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        import socket

        def listening() -> bool:
            assert self.proc.poll() is None, f"nginx exited: {(root / 'nginx.log').read_text()[-2000:]}"
            with socket.socket() as sk:
                return sk.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 30, "nginx listening")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        self.log.close()


@pytest.fixture(scope="session")
def webdav_server(tmp_path_factory):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not nginx or not DAV_MODULE.exists():
        pytest.skip("no WebDAV server to test against: install nginx and libnginx-mod-http-dav-ext "
                    "(scripts/install-deps.sh does)")
    server = WebdavServer(tmp_path_factory.mktemp("webdav"))
    yield server
    server.stop()


class WebdavStore:
    """A snapshot.store: webdav, in a collection of its own on the shared server."""

    kind = "webdav"
    counter = 0

    def __init__(self, server: WebdavServer):
        WebdavStore.counter += 1
        self.server = server
        self.name = f"snapshots-{WebdavStore.counter}"
        (server.root / "www" / self.name).mkdir()

    def flags(self) -> list[str]:
        return ["-snapshot-store", "webdav", "-snapshot-webdav-url", self.location(),
                "-snapshot-webdav-user", WebdavServer.USER, "-snapshot-webdav-password", WebdavServer.PASSWORD]

    def env(self) -> dict:
        return {}

    def location(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/{self.name}/"

    def files(self) -> Path:
        return self.server.root / "www" / self.name


@pytest.fixture(params=["dir", "s3", "sftp", "webdav"])
def store(request, tmp_path):
    if request.param == "dir":
        return DirStore(tmp_path / "snapshots")
    if request.param == "sftp":
        return SftpStore(request.getfixturevalue("sftp_server"))
    if request.param == "webdav":
        return WebdavStore(request.getfixturevalue("webdav_server"))
    return S3Store(request.getfixturevalue("s3_server"))


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


def scrape(node) -> dict[str, float]:
    """The node's /metrics as {name: value} (labels dropped)."""
    with urllib.request.urlopen(node.http_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series.split("{")[0]] = float(value)
    return out


def test_save_restore_join_converge(cluster, store, tmp_path):
    """A fourth node with no database restores the newest snapshot of a busy
    cluster, joins it and ends with identical dumps; restarting it with its
    volume intact restores nothing."""
    n1 = cluster.node(1)
    k = store.kind  # the shared cluster sees this test once per store
    for i in range(200):
        n1.execute("INSERT INTO books (title, author, publication_year) VALUES (?, ?, ?)",
                   (f"{k}-before-{i}", "snap", 1900 + i % 100))
    n1.execute("DELETE FROM books WHERE title = ?", (f"{k}-before-7",))  # a tombstone travels in the snapshot
    cluster.wait_converged(["books", "authors"])

    n4 = fresh_node(cluster, tmp_path / "node4")
    with Writer(cluster.nodes[:2], f"{k}-busy"):
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
        # in WAL mode like the database it replaces, before anyone opens it: the header's
        # read and write versions (bytes 18 and 19) are 2 for WAL, 1 for a rollback journal
        assert n4.db_path.read_bytes()[18:20] == b"\x02\x02"
        assert not Path(str(n4.db_path) + "-wal").exists()
        # the capture machinery of node 1 is gone, its replicated state is there
        names = {row[0] for row in n4.query("SELECT name FROM sqlite_schema")}
        assert not any(nm.endswith("_change_log") for nm in names), names
        assert n4.scalar("SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'") == 0
        assert n4.scalar("SELECT count(*) FROM __harmonylite__outbox") == 0
        assert n4.scalar("SELECT count(*) FROM __harmonylite__meta WHERE key IN ('node_id', 'epoch')") == 0
        assert n4.scalar("SELECT count(*) FROM __harmonylite__books_clock WHERE deleted = 1") >= 1
        assert n4.scalar("SELECT seq FROM __harmonylite__seq WHERE stream = ?", (harness.STREAM,)) > 0
        assert n4.scalar("SELECT count(*) FROM books WHERE title = ?", (f"{k}-before-199",)) == 1
        n4.start()
        cluster.wait_for_triggers(["books", "authors"], [n4])
        metrics = scrape(n4)
        assert metrics.get("harmonylite_restores_total") == 1, metrics
        assert abs(metrics["harmonylite_restored_timestamp_seconds"] - time.time()) < 600
    # the new node's own writes reach everyone, and everyone's reach it
    n4.execute("INSERT INTO books (title, author, publication_year) VALUES (?, 'node4', 2024)", (f"{k}-from-4",))
    n1.execute("UPDATE books SET publication_year = 1111 WHERE title = ?", (f"{k}-before-3",))
    everyone = cluster.nodes + [n4]
    try:
        cluster.wait_converged(["books", "authors"], nodes=everyone)
        titles = {row[0] for row in n4.query("SELECT title FROM books")}
        assert f"{k}-from-4" in titles and f"{k}-before-7" not in titles and f"{k}-busy-0" in titles
    finally:
        n4.stop()

    # restart with the volume intact: nothing restored, nothing replaced
    ino = n4.db_path.stat().st_ino
    before = n4.dump(["books"])
    r = run(n4, store, "-restore")
    assert r.returncode == 0, r.stderr
    assert "has data" in r.stdout and "no restore" in r.stdout, r.stdout
    assert n4.db_path.stat().st_ino == ino and n4.dump(["books"]) == before
    # -force replaces it: the file counts its second restore
    r = run(n4, store, "-restore", "-force")
    assert r.returncode == 0 and "restored" in r.stdout, r.stdout + r.stderr
    assert n4.scalar("SELECT value FROM __harmonylite__meta WHERE key = 'restores'") == 2


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
    for i in range(1, 8):
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
    (files / bad[4]).write_text((files / good).read_text())      # an older manifest replayed under a newer name
    (files / obj(bad[5])).unlink()                               # the object is gone
    doc = json.loads((files / bad[6]).read_text())
    doc["db_size"] = "9000000000000000000"                       # more than any disk
    (files / bad[6]).write_text(json.dumps(doc))

    n = fresh_node(cluster, tmp_path / "node6", 6)
    r = run(n, store, "-restore")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert good in r.stdout, r.stdout
    log = r.stdout + r.stderr
    assert log.count("snapshot refused") == 7, log
    assert "bytes beside db_path, only" in log, log
    assert "manifest names object" in log and obj(good) in log, log
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

    # a database whose rows are all still in its -wal is not empty, even with the main file gone
    w = fresh_node(cluster, tmp_path / "node11", 11)
    conn = harness.connect(w.db_path)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE mine (x)")
    conn.execute("INSERT INTO mine VALUES (1)")
    wal = Path(str(w.db_path) + "-wal")
    saved = wal.read_bytes()
    conn.close()  # the last close checkpoints and removes the -wal: put it back as a crash would leave it
    w.db_path.unlink()
    wal.write_bytes(saved)
    r = run(w, store, "-restore")
    assert r.returncode == 0 and "has data" in r.stdout, f"{r.stdout}\n{r.stderr}"
    assert wal.read_bytes() == saved and not w.db_path.exists()

    # nothing verifies: an error, and no database appears
    _flip(files / obj(good), 3000)
    m = fresh_node(cluster, tmp_path / "node7", 7)
    r = run(m, store, "-restore")
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "none of the 8 snapshots" in r.stderr, r.stderr
    assert not m.db_path.exists()
    assert not [p for p in m.root.iterdir() if ".restore-" in p.name]


def test_keep_newest(cluster, store):
    """snapshot.keep: older snapshots (manifest and object) are removed, and so
    is an object an interrupted upload left without a manifest."""
    n1 = cluster.node(1)
    store.files().mkdir(parents=True, exist_ok=True)
    orphan = store.files() / "snap-20000101T000000000Z-n9-00000000.db.zst"
    orphan.write_bytes(b"half an upload")
    made = [save(n1, store)]
    assert not orphan.exists()
    made += [save(n1, store) for _ in range(3)]
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
    for flags, want in ((["-save-snapshot", "-restore"], "give one of them"),
                        (["-save-snapshot", "-force"], "-force only goes with -restore"),
                        (["-restore=1"], "takes no value")):
        r = subprocess.run([str(hl_bin), "-db-path", str(db), "-node-id", "1", *flags], capture_output=True,
                           text=True, timeout=CMD_TIMEOUT)
        assert r.returncode == 2 and want in r.stderr, (flags, r.stderr)


def test_s3_multipart_and_credentials(cluster, s3_server, tmp_path):
    """A snapshot larger than snapshot.s3_part_size goes up as a multipart
    upload and restores byte-exact; credentials from the configuration work
    like those from the environment, and never show in output or logs; an
    upload the server refuses leaves the previous snapshots usable."""
    store = S3Store(s3_server, part_size=5 << 20)
    n1 = cluster.node(1)
    cluster.create_tables("CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, b BLOB)", ["blobs"])
    try:
        with harness.transaction(n1.connect()) as conn:
            for i in range(12):
                conn.execute("INSERT INTO blobs (id, b) VALUES (?, randomblob(1048576))", (i,))
        cluster.wait_converged(["blobs"])
        creds = ["-snapshot-s3-access-key", S3Server.ACCESS, "-snapshot-s3-secret-key", S3Server.SECRET]
        n1.write_config()
        r = subprocess.run(n1.argv(*store.flags(), *creds, "-save-snapshot"), capture_output=True, text=True,
                           timeout=CMD_TIMEOUT, env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        good = r.stdout.strip().split()[-1][len(store.location()):]
        assert S3Server.SECRET not in r.stdout + r.stderr
        obj = store.files() / good.replace(".manifest.json", ".db.zst")
        size = obj.stat().st_size
        assert size > 10 << 20
        etag = os.getxattr(obj, "user.etag").decode()
        assert etag.rstrip('"').endswith(f"-{(size + (5 << 20) - 1) // (5 << 20)}"), etag  # a multipart ETag

        # refused by the server (a wrong secret): exit 1, the reason, nothing new, nothing removed
        before = _names(store)
        r = run(n1, store, "-save-snapshot", "-snapshot-s3-secret-key", "not-the-secret-xyz")
        assert r.returncode == 1, r.stderr
        assert "SignatureDoesNotMatch" in r.stderr and "not-the-secret-xyz" not in r.stdout + r.stderr
        assert sorted(_names(store)) == sorted(before)
        r = run(n1, store, "-check-config", "-snapshot-s3-secret-key", "not-the-secret-xyz",
                "-snapshot-s3-session-token", "tok-xyz")
        assert r.returncode == 0 and "not-the-secret-xyz" not in r.stdout + r.stderr and "tok-xyz" not in r.stdout
        assert 's3_secret_key: "<redacted>"' in r.stdout, r.stdout

        n = fresh_node(cluster, tmp_path / "node8", 8)
        r = run(n, store, "-restore")
        assert r.returncode == 0 and good in r.stdout, f"{r.stdout}\n{r.stderr}"
        assert n.dump(["blobs"]) == n1.dump(["blobs"])
    finally:
        cluster.exec_all("DROP TABLE IF EXISTS blobs")


def test_s3_configuration_errors(tmp_path, hl_bin):
    """What the s3 store needs is checked before anything is read or sent: exit 2, the key, what was expected."""
    db = tmp_path / "a.db"
    base = [str(hl_bin), "-db-path", str(db), "-node-id", "1", "-save-snapshot"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    cases = [
        ([], "snapshot.s3_bucket: expected"),
        (["-snapshot-s3-bucket", "Bad_Bucket"], "snapshot.s3_bucket: expected 3 to 63"),
        (["-snapshot-s3-bucket", "b1b", "-snapshot-s3-prefix", "../x/"], "snapshot.s3_prefix: expected"),
        (["-snapshot-s3-bucket", "b1b"], "snapshot.s3_access_key and snapshot.s3_secret_key: expected"),
        (["-snapshot-s3-bucket", "b1b", "-snapshot-s3-access-key", "a", "-snapshot-s3-secret-key", "s",
          "-snapshot-s3-endpoint", "ftp://x"], "snapshot.s3_endpoint: expected an http:// or https:// URL"),
        (["-snapshot-s3-bucket", "b1b", "-snapshot-s3-access-key", "a", "-snapshot-s3-secret-key", "s",
          "-snapshot-s3-endpoint", "http://h/path"], "snapshot.s3_endpoint: expected scheme://host[:port]"),
    ]
    for extra, want in cases:
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=CMD_TIMEOUT, env=env)
        assert r.returncode == 2 and want in r.stderr, (extra, r.returncode, r.stderr)
    assert not db.exists()


def test_sftp_host_key_must_be_known(cluster, sftp_server, tmp_path):
    """The SSH server's key must be in known_hosts: a different key is refused
    at once (not retried), and nothing is written."""
    store = SftpStore(sftp_server)
    n1 = cluster.node(1)
    r = run(n1, store, "-save-snapshot", "-snapshot-sftp-known-hosts", str(sftp_server.wrong_known_hosts))
    assert r.returncode == 1 and "host key is not in snapshot.sftp_known_hosts" in r.stderr, r.stderr
    assert "retrying" not in r.stderr
    assert list(store.files().iterdir()) == []
    r = run(n1, store, "-save-snapshot", "-snapshot-sftp-known-hosts", str(tmp_path / "missing"))
    assert r.returncode == 2 and "snapshot.sftp_known_hosts: expected" in r.stderr, r.stderr
    # an encrypted key: refused without its passphrase (not retried), works with it, never shown
    key = ["-snapshot-sftp-key-file", str(sftp_server.root / "phrasekey")]
    r = run(n1, store, "-save-snapshot", *key)
    assert r.returncode == 1 and "retrying" not in r.stderr, r.stderr
    r = run(n1, store, "-save-snapshot", *key, "-snapshot-sftp-key-passphrase", SftpServer.PHRASE)
    assert r.returncode == 0, r.stderr
    assert SftpServer.PHRASE not in r.stdout + r.stderr
    assert len(manifests(store)) == 1


def test_webdav_credentials_stay_secret(cluster, webdav_server):
    """A wrong WebDAV password is refused at once (HTTP 401, not retried), the
    store is left as it was, and the password shows nowhere."""
    store = WebdavStore(webdav_server)
    n1 = cluster.node(1)
    save(n1, store)
    before = _names(store)
    r = run(n1, store, "-save-snapshot", "-snapshot-webdav-password", "wrong-pass-xyz")
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "retrying" not in r.stderr, r.stderr
    assert "wrong-pass-xyz" not in r.stdout + r.stderr and WebdavServer.PASSWORD not in r.stdout + r.stderr
    assert sorted(_names(store)) == sorted(before)
    assert not [p for p in store.files().iterdir() if p.name.startswith(".")]


def _make_tls(d: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for names (DNS) and 127.0.0.1; (ca, cert, key)."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hl test CA",
         "-keyout", "ca.key", "-out", "ca.pem")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
         "-out", "server.csr")
    san = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1"])
    (d / "ext.cnf").write_text(f"subjectAltName={san}\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def test_s3_tls_and_virtual_host_addressing(cluster, s3_binary, tmp_path):
    """https with a CA file, and virtual-host addressing (<bucket>.<endpoint host>): a snapshot
    goes up and comes back; without the CA the server is refused at once, not retried."""
    ca, cert, key = _make_tls(tmp_path, ["localhost", "snapshots.localhost"])
    # libcurl resolves localhost and *.localhost to the loopback address itself
    server = S3Server(s3_binary, tmp_path, ("--cert", str(cert), "--key", str(key), "--virtual-domain", "localhost"))
    try:
        store = S3Store(server)
        flags = ["-snapshot-s3-endpoint", f"https://localhost:{server.port}", "-snapshot-s3-path-style", "false"]
        n1 = cluster.node(1)
        r = run(n1, store, "-save-snapshot", *flags)
        assert r.returncode == 1 and "certificate" in r.stderr and "retrying" not in r.stderr, r.stderr
        assert not _names(store)
        flags += ["-snapshot-s3-ca-file", str(ca)]
        good = save(n1, store, *flags)
        assert good in manifests(store)
        n = fresh_node(cluster, tmp_path / "node9", 9)
        r = run(n, store, "-restore", *flags)
        assert r.returncode == 0 and good in r.stdout, f"{r.stdout}\n{r.stderr}"
        assert n.scalar("PRAGMA integrity_check") == "ok"
    finally:
        server.stop()


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = CMD_TIMEOUT) -> str:
    """Reads proc's stderr until a line contains text; returns what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no line with {text!r} from {proc.args[0]}:\n" + "".join(seen))


def test_s3_server_away_is_retried(cluster, s3_binary, tmp_path):
    """The S3 server is down when -save-snapshot and -restore start: each says it
    retries, and succeeds once the server is back; the earlier snapshot is untouched."""
    server = S3Server(s3_binary, tmp_path)
    store = S3Store(server)
    n1 = cluster.node(1)
    first = save(n1, store)
    port = server.port
    server.stop()
    try:
        env = dict(os.environ, **store.env())
        n1.write_config()
        p = subprocess.Popen(n1.argv(*store.flags(), "-save-snapshot"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        before = _wait_for_line(p, "retrying")
        server = S3Server(s3_binary, tmp_path, port=port)
        out, rest = p.communicate(timeout=CMD_TIMEOUT)
        assert p.returncode == 0, before + rest
        second = out.strip().split()[-1][len(store.location()):]
        assert manifests(store) == sorted([first, second])

        server.stop()
        n = fresh_node(cluster, tmp_path / "node10", 10)
        n.write_config()
        p = subprocess.Popen(n.argv(*store.flags(), "-restore"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        before = _wait_for_line(p, "retrying")
        assert "listing" in before, before
        server = S3Server(s3_binary, tmp_path, port=port)
        out, rest = p.communicate(timeout=CMD_TIMEOUT)
        assert p.returncode == 0 and second in out, before + rest
    finally:
        server.stop()


def test_snapshot_keeps_rowids_of_tables_without_a_key(tmp_path, hl_bin):
    """A plain VACUUM renumbers rowid tables without an INTEGER PRIMARY KEY (docs/architecture.md);
    the copy a snapshot is made of must not, or the restored rows would not match their clocks
    and the other nodes' numbering."""
    db = tmp_path / "a.db"
    harness.execute(db, "CREATE TABLE nokey (x TEXT); INSERT INTO nokey VALUES ('a'), ('b'), ('c'), ('d'), ('e');"
                        "DELETE FROM nokey WHERE x IN ('b', 'd')", script=True)
    # harmonylite's own tables, as any start creates them (this action needs no NATS)
    subprocess.run([str(hl_bin), "-db-path", str(db), "-node-id", "1", "-drop-held", "1"], check=True,
                   capture_output=True, timeout=CMD_TIMEOUT)
    snaps = tmp_path / "s"
    snaps.mkdir()
    flags = ["-node-id", "1", "-snapshot-store", "dir", "-snapshot-dir", str(snaps)]
    r = subprocess.run([str(hl_bin), "-db-path", str(db), *flags, "-save-snapshot"], capture_output=True, text=True,
                       timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "b.db"
    r = subprocess.run([str(hl_bin), "-db-path", str(out), *flags, "-restore"], capture_output=True, text=True,
                       timeout=CMD_TIMEOUT)
    assert r.returncode == 0 and "restored" in r.stdout, r.stderr
    assert harness.query(out, "SELECT rowid, x FROM nokey ORDER BY rowid") == [(1, "a"), (3, "c"), (5, "e")]
