"""harness.py - runs real harmonylite processes for the end-to-end tests.

What is here, from the bottom up:

- ports: free loopback ports, picked below the kernel's ephemeral range so a
  restarted node gets its ports back;
- sqlite helpers: connections opened like an application would (WAL, busy
  timeout), full dumps of the user tables that compare types and bytes exactly;
- wait_until: poll a condition with a timeout and say what was last seen;
- Node: one harmonylite process with its own YAML config, database, data dir
  and log file: start (wait for the "started" log line), stop (SIGTERM, exit 0
  expected), kill (SIGKILL of the whole process tree), restart;
- Cluster: three nodes with embedded NATS routed to each other;
- NATS/wire helpers: publish and read raw messages of the replication stream,
  in the format of docs/protocol.md (48-byte header + CBOR changeset).

Everything here waits with generous timeouts and never asserts on durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

#: How long a node may take to log "started" (JetStream cluster formation, ASan).
STARTUP_TIMEOUT = float(os.environ.get("HL_E2E_STARTUP_TIMEOUT", "90"))
#: How long a single change may take to reach another node.
REPL_TIMEOUT = float(os.environ.get("HL_E2E_REPL_TIMEOUT", "30"))
#: How long bulk work (thousands of rows, 16 MiB values, crash recovery) may take.
SLOW_TIMEOUT = float(os.environ.get("HL_E2E_SLOW_TIMEOUT", "120"))
#: How long a node may take to exit after SIGTERM.
STOP_TIMEOUT = float(os.environ.get("HL_E2E_STOP_TIMEOUT", "45"))

#: The application schema every test cluster starts with (as in HarmonyLite's e2e tests).
BOOKS_SCHEMA = """
CREATE TABLE books (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    author TEXT NOT NULL,
    publication_year INTEGER
);
INSERT INTO books (title, author, publication_year) VALUES
    ('The Hitchhiker''s Guide to the Galaxy', 'Douglas Adams', 1979),
    ('The Lord of the Rings', 'J.R.R. Tolkien', 1954),
    ('Harry Potter and the Sorcerer''s Stone', 'J.K. Rowling', 1997),
    ('The Catcher in the Rye', 'J.D. Salinger', 1951),
    ('To Kill a Mockingbird', 'Harper Lee', 1960),
    ('1984', 'George Orwell', 1949),
    ('The Great Gatsby', 'F. Scott Fitzgerald', 1925);
CREATE TABLE authors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    birth_year INTEGER
);
INSERT INTO authors (name, birth_year) VALUES ('Douglas Adams', 1952), ('Harper Lee', 1926);
"""

STREAM = "harmonylite-changes-0"
SUBJECT = "harmonylite-change-log.0"

# Console: "<time> INF started ..."; JSON: {"level":"info","msg":"started",...}.
_STARTED_RE = re.compile(r'(?:\bINF started(?:\s|$))|(?:"(?:msg|message)"\s*:\s*"started")')
# Sanitizer reports in a node's log mean a bug even when the process survived.
_SANITIZER_RE = re.compile(r"ERROR: (?:AddressSanitizer|LeakSanitizer)|runtime error: |UndefinedBehaviorSanitizer")


def harmonylite_binary() -> Path:
    """The binary under test: $HARMONYLITE_BIN, else build/harmonylite."""
    env = os.environ.get("HARMONYLITE_BIN")
    return Path(env).resolve() if env else REPO_ROOT / "build" / "harmonylite"


# --------------------------------------------------------------------------- nats-server versions

def nats_server_bin() -> str:
    """The nats-server embedded nodes run: $HL_NATS_SERVER, else Debian's on PATH (2.9.10)."""
    return os.environ.get("HL_NATS_SERVER") or "nats-server"


_current_nats: Optional[tuple[Optional[str], str]] = None


def current_nats_server() -> tuple[Optional[str], str]:
    """(path, "") of a current nats-server release built by scripts/install-go-tools.sh
    (cached outside the repository; the first call may take minutes), or (None, why)
    when it cannot be had (no go and no module proxy)."""
    global _current_nats
    if _current_nats is None:
        r = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install-go-tools.sh"), "nats-server"],
                           capture_output=True, text=True)
        path = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
        if path and os.access(path, os.X_OK):
            _current_nats = (path, "")
        else:
            _current_nats = (None, f"scripts/install-go-tools.sh nats-server failed ({r.returncode}): "
                                   f"{r.stderr.strip()[-600:]}")
    return _current_nats


# --------------------------------------------------------------------------- ports

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port nothing listens on, never handed out twice per process.

    Ports come from below the ephemeral range: a port the kernel picked for some
    outgoing connection could not be bound again when a node restarts.
    """
    lo_eph, _ = _ephemeral_range()
    hi = max(lo_eph - 1, 11000)
    lo = 10000 if hi > 20000 else 1024
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    with _ports_lock:
        for _ in range(2000):
            port = rng.randint(lo, hi)
            if port in _ports_handed_out or port in (14221, 14222, 14223, 16221, 16222, 16223, 18081, 18082, 18083):
                continue  # the examples/ demo cluster's fixed ports
            if _port_is_free(port):
                _ports_handed_out.add(port)
                return port
    raise RuntimeError("no free loopback port found")


# --------------------------------------------------------------------------- waiting


class WaitTimeout(AssertionError):
    pass


def wait_until(fn: Callable[[], Any], timeout: float = REPL_TIMEOUT, msg: str = "condition",
               interval: float = 0.2) -> Any:
    """Calls fn until it returns a truthy value and returns that value.

    sqlite3 errors (a table not replicated yet, a busy database) count as "not
    yet". On timeout raises WaitTimeout naming msg and the last value or error.
    """
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
            if last:
                return last
        except (sqlite3.Error, OSError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {msg}; last seen: {_short(last)}")
        time.sleep(interval)


def wait_equal(fetch: Callable[[], Any], expected: Any, timeout: float = REPL_TIMEOUT, msg: str = "value",
               interval: float = 0.2) -> None:
    """Waits until fetch() == expected; on timeout the message shows the last value
    (for sets: what is missing and what is extra)."""
    __tracebackhide__ = True
    seen: list = []

    def check() -> bool:
        seen[:] = [fetch()]
        return seen[0] == expected

    try:
        wait_until(check, timeout, msg, interval)
    except WaitTimeout as e:
        if not seen:
            raise
        got = seen[0]
        if isinstance(got, set) and isinstance(expected, set):
            detail = (f"{len(expected - got)} missing (e.g. {sorted(expected - got)[:10]}), "
                      f"{len(got - expected)} unexpected (e.g. {sorted(got - expected)[:10]})")
        else:
            detail = f"expected {_short(expected)}, last seen {_short(got)}"
        raise WaitTimeout(f"{str(e).split('; last seen')[0]}: {detail}") from None


def _short(v: Any, limit: int = 600) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


# --------------------------------------------------------------------------- sqlite


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect(path: os.PathLike | str, trusted_schema: Optional[bool] = None) -> sqlite3.Connection:
    """Opens a database the way an application would: WAL, 30 s busy timeout,
    autocommit (use transaction() for explicit transactions)."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA journal_mode = WAL")
    if trusted_schema is not None:
        conn.execute(f"PRAGMA trusted_schema = {'ON' if trusted_schema else 'OFF'}")
    return conn


class transaction:
    """`with transaction(conn):` runs BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, conn: sqlite3.Connection, mode: str = "IMMEDIATE"):
        self.conn = conn
        self.mode = mode

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute(f"BEGIN {self.mode}")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def query(path: os.PathLike | str, sql: str, params: Iterable = ()) -> list[tuple]:
    conn = connect(path)
    try:
        return conn.execute(sql, tuple(params)).fetchall()
    finally:
        conn.close()


def execute(path: os.PathLike | str, sql: str, params: Iterable = (), script: bool = False) -> Optional[int]:
    """Runs one statement (or a script) in its own connection; returns lastrowid."""
    conn = connect(path)
    try:
        if script:
            conn.executescript(sql)
            return None
        return conn.execute(sql, tuple(params)).lastrowid
    finally:
        conn.close()


def _is_internal(name: str) -> bool:
    low = name.lower()
    return low.startswith("sqlite_") or low.startswith("__harmonylite__")


def user_tables(conn: sqlite3.Connection) -> list[str]:
    """Every table harmonylite replicates: not sqlite_*, not __harmonylite__*,
    not virtual tables nor their shadow tables."""
    try:
        rows = conn.execute("SELECT name, type FROM pragma_table_list WHERE schema = 'main'").fetchall()
        names = [n for n, t in rows if t == "table"]
    except sqlite3.Error:  # SQLite < 3.37
        rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
        names = [n for n, s in rows if not (s or "").upper().startswith("CREATE VIRTUAL")]
    return sorted(n for n in names if not _is_internal(n))


def internal_objects(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(type, name) of every __harmonylite__* object (tables, triggers, indexes, views)."""
    rows = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
    return sorted((t, n) for t, n in rows if n.lower().startswith("__harmonylite__"))


def app_schema(conn: sqlite3.Connection) -> list[tuple]:
    """The application's own schema objects (everything not sqlite_* / __harmonylite__*)."""
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    return sorted(r for r in rows if not _is_internal(r[1]))


def _without_rowid(conn: sqlite3.Connection, table: str) -> bool:
    try:
        row = conn.execute("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?", (table,)).fetchone()
        if row is not None:
            return bool(row[0])
    except sqlite3.Error:
        pass
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return bool(sql and re.search(r"\)\s*WITHOUT\s+ROWID\s*[;]?\s*$", sql[0], re.I))


def _norm(v: Any) -> Any:
    if isinstance(v, float):
        return ("real", v.hex())  # keeps -0.0 and the exact bits
    return v


def table_dump(conn: sqlite3.Connection, table: str) -> tuple[tuple[str, ...], list[tuple]]:
    """(column names, rows) of one table; each value as (typeof, value) with TEXT
    as bytes, so types and bytes compare exactly. Tables without a declared
    primary key are replicated by rowid, so their rowid is part of the dump."""
    info = conn.execute(f"PRAGMA table_info({quote_ident(table)})").fetchall()
    cols = [r[1] for r in info]
    has_pk = any(r[5] for r in info)
    exprs = []
    names = []
    if not has_pk and not _without_rowid(conn, table):
        exprs.append("typeof(_rowid_), _rowid_")
        names.append("_rowid_")
    for c in cols:
        q = quote_ident(c)
        exprs.append(f"typeof({q}), {q}")
        names.append(c)
    old = conn.text_factory
    conn.text_factory = bytes
    try:
        raw = conn.execute(f"SELECT {', '.join(exprs)} FROM {quote_ident(table)}").fetchall()
    finally:
        conn.text_factory = old
    rows = []
    for r in raw:
        vals = tuple((r[i].decode() if isinstance(r[i], bytes) else r[i], _norm(r[i + 1])) for i in range(0, len(r), 2))
        rows.append(vals)
    rows.sort(key=repr)
    return tuple(names), rows


def full_dump(path: os.PathLike | str, tables: Optional[Iterable[str]] = None) -> dict[str, tuple]:
    """{table: (columns, sorted rows)} for the given tables, or for every user table."""
    conn = connect(path)
    try:
        names = list(tables) if tables is not None else user_tables(conn)
        return {t: table_dump(conn, t) for t in names}
    finally:
        conn.close()


def dump_diff(a: dict, b: dict, name_a: str = "a", name_b: str = "b", limit: int = 5) -> str:
    """A short human description of how two full_dump() results differ ('' if equal)."""
    out = []
    for t in sorted(set(a) | set(b), key=str):
        if t not in a or t not in b:
            out.append(f"table {t!r} only on {name_a if t in a else name_b}")
            continue
        (ca, ra), (cb, rb) = a[t], b[t]
        if ca != cb:
            out.append(f"table {t!r}: columns {ca} on {name_a} vs {cb} on {name_b}")
            continue
        if ra == rb:
            continue
        sa, sb = set(map(repr, ra)), set(map(repr, rb))
        only_a = sorted(sa - sb)[:limit]
        only_b = sorted(sb - sa)[:limit]
        out.append(f"table {t!r}: {len(ra)} rows on {name_a}, {len(rb)} on {name_b}; "
                   f"only on {name_a}: {[_short(x, 200) for x in only_a]}; "
                   f"only on {name_b}: {[_short(x, 200) for x in only_b]}")
    return "\n".join(out)


# --------------------------------------------------------------------------- processes


def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..." - comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 2:
            out[int(d)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for p, pp in _ppid_map().items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # If the test runner dies, its nodes get SIGTERM and shut down cleanly
    # (stopping their nats-server) instead of lingering.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_live_nodes: "set[Node]" = set()
_live_lock = threading.Lock()


def kill_all_nodes() -> None:
    """Last-resort cleanup (atexit, interrupted session): SIGKILL every node tree."""
    with _live_lock:
        nodes = list(_live_nodes)
    for n in nodes:
        try:
            n.kill()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_yaml(d: dict, indent: int = 0) -> str:
    """A small YAML emitter for nested dicts of scalars and lists of scalars."""
    pad = "  " * indent
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"{pad}{k}:")
            out.append(to_yaml(v, indent + 1))
        elif isinstance(v, (list, tuple)):
            if not v:
                out.append(f"{pad}{k}: []")
            else:
                out.append(f"{pad}{k}:")
                out.extend(f"{pad}  - {_yaml_scalar(x)}" for x in v)
        else:
            out.append(f"{pad}{k}: {_yaml_scalar(v)}")
    return "\n".join(out)


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


class Node:
    """One harmonylite process and its files under `root`.

    `settings` is the YAML config as a dict (change it, then restart).
    With cli_cluster=True the node id, cluster address and peers are given as
    the -node-id/-cluster-addr/-cluster-peers flags instead of in the YAML.
    """

    def __init__(self, binary: Path, root: Path, node_id: int, client_port: int, cluster_port: int,
                 http_port: int, peer_cluster_ports: list[int], cli_cluster: bool = False,
                 settings: Optional[dict] = None, external_urls: Optional[list[str]] = None):
        self.binary = Path(binary)
        self.id = node_id
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "app.db"
        self.data_dir = self.root / "data"
        self.config_path = self.root / "harmonylite.yaml"
        self.log_path = self.root / "harmonylite.log"
        self.client_port = client_port
        self.cluster_port = cluster_port
        self.http_port = http_port
        self.peer_cluster_ports = list(peer_cluster_ports)
        self.cli_cluster = cli_cluster
        self.settings: dict = {
            "db_path": str(self.db_path),
            "node_id": node_id,
            "data_dir": str(self.data_dir),
            "polling_interval": 500,
            "replication_log": {"shards": 1, "max_entries": 1000000, "replicas": 3, "compress": True},
            "nats": {
                "server_bin": nats_server_bin(),
                "bind_address": f"127.0.0.1:{client_port}",
                "cluster_addr": f"127.0.0.1:{cluster_port}",
                "cluster_peers": self.peer_urls,
            },
            "http": {"bind": f"127.0.0.1:{http_port}"},
            "logging": {"verbose": os.environ.get("HL_E2E_VERBOSE") == "1", "format": "console"},
        }
        if external_urls:  # external mode: no embedded nats-server
            self.settings["nats"] = {"urls": list(external_urls)}
        if settings:
            _deep_update(self.settings, settings)
        self.proc: Optional[subprocess.Popen] = None
        self.expected_running = False
        self.starts = 0
        self._log_offset = 0
        self._scan_offset = 0

    def __repr__(self) -> str:
        return f"<node {self.id} pid={self.proc.pid if self.proc else None}>"

    @property
    def peer_urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.peer_cluster_ports]

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- config and command line

    def write_config(self) -> None:
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.settings.items()}
        if self.cli_cluster:
            cfg.pop("node_id", None)
            nats_cfg = cfg.get("nats", {})
            nats_cfg.pop("cluster_addr", None)
            nats_cfg.pop("cluster_peers", None)
        self.config_path.write_text(f"# written by tests/e2e/harness.py for node {self.id}\n" + to_yaml(cfg) + "\n")

    def argv(self, *extra: str) -> list[str]:
        args = [str(self.binary), "-config", str(self.config_path)]
        if self.cli_cluster:
            nats_cfg = self.settings["nats"]
            args += ["-node-id", str(self.settings["node_id"]),
                     "-cluster-addr", nats_cfg["cluster_addr"],
                     "-cluster-peers", ",".join(nats_cfg["cluster_peers"])]
        return args + list(extra)

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True, timeout: float = STARTUP_TIMEOUT) -> None:
        assert not self.running, f"node {self.id} is already running"
        self.write_config()
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(f"\n=== harness: start #{self.starts} at {time.strftime('%H:%M:%S')}: "
                    f"{' '.join(self.argv())} ===\n".encode())
            self._log_offset = f.tell()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.root, start_new_session=True, preexec_fn=_child_setup)
        finally:
            log.close()
        self.expected_running = True
        with _live_lock:
            _live_nodes.add(self)
        if wait:
            self.wait_started(timeout)

    def wait_started(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Waits for the "started" line of the current run; fails early if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since_start()
            if any(_STARTED_RE.search(line) for line in text.splitlines()):
                return
            if self.proc is None or self.proc.poll() is not None:
                rc = None if self.proc is None else self.proc.returncode
                self.expected_running = False
                raise AssertionError(f"node {self.id} exited with {rc} before logging 'started'\n"
                                     + self.log_tail())
            if time.monotonic() >= deadline:
                raise AssertionError(f"node {self.id} did not log 'started' within {timeout:.0f}s\n"
                                     + self.log_tail())
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then asserts a clean exit (status 0, nats-server child gone)."""
        if self.proc is None or self.proc.poll() is not None:
            self.expected_running = False
            return
        kids = descendants(self.proc.pid)
        self.expected_running = False
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node {self.id} did not exit within {timeout:.0f}s of SIGTERM\n" + self.log_tail())
        deadline = time.monotonic() + 15
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [k for k in kids if _alive(k)]
        for k in left:
            _signal(k, signal.SIGKILL)
        with _live_lock:
            _live_nodes.discard(self)
        if rc != 0:
            raise AssertionError(f"node {self.id} exited with status {rc} after SIGTERM (expected 0)\n"
                                 + self.log_tail())
        if left:
            raise AssertionError(f"node {self.id} exited but left child processes {left} running "
                                 f"(nats-server must be stopped on shutdown)\n" + self.log_tail())
        self.check_log_clean()

    def kill(self) -> None:
        """SIGKILL the node and every process it started: a crash of the whole pod."""
        if self.proc is None:
            return
        self.expected_running = False
        if self.proc.poll() is None:
            pid = self.proc.pid
            _signal(pid, signal.SIGSTOP)  # no new children while we collect them
            kids = descendants(pid)
            for k in kids:
                _signal(k, signal.SIGKILL)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _signal(pid, signal.SIGKILL)
            self.proc.wait(30)
            deadline = time.monotonic() + 10
            while any(_alive(k) for k in kids) and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(self.log_path, "ab") as f:
                f.write(f"\n=== harness: SIGKILL at {time.strftime('%H:%M:%S')} ===\n".encode())
        with _live_lock:
            _live_nodes.discard(self)

    def restart(self, settings: Optional[dict] = None, wait: bool = True) -> None:
        self.stop()
        if settings:
            _deep_update(self.settings, settings)
        self.start(wait=wait)

    # -- logs

    def log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            text = ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"----- node {self.id} log tail ({self.log_path}) -----\n{tail}\n----- end of node {self.id} log -----"

    def check_log_clean(self) -> None:
        """Fails when the log has a sanitizer report written since the last check."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._scan_offset)
                text = f.read().decode("utf-8", "replace")
                self._scan_offset = f.tell()
        except OSError:
            return
        m = _SANITIZER_RE.search(text)
        if m:
            start = max(0, m.start() - 200)
            raise AssertionError(f"node {self.id} log has a sanitizer report:\n{text[start:start + 4000]}")

    # -- the application's side of the database

    def connect(self, trusted_schema: Optional[bool] = None) -> sqlite3.Connection:
        return connect(self.db_path, trusted_schema)

    def execute(self, sql: str, params: Iterable = ()) -> Optional[int]:
        return execute(self.db_path, sql, params)

    def executescript(self, sql: str) -> None:
        execute(self.db_path, sql, script=True)

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        return query(self.db_path, sql, params)

    def scalar(self, sql: str, params: Iterable = ()) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    def dump(self, tables: Optional[Iterable[str]] = None) -> dict:
        return full_dump(self.db_path, tables)

    def triggers_on(self, table: str) -> int:
        return self.scalar("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? COLLATE NOCASE "
                           "AND name LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\'", (table,))


class Cluster:
    """Three (or `size`) nodes with embedded NATS, every node routed to the others.

    Node `cli_node` takes its id, cluster address and peers from flags rather
    than from the YAML, so both ways stay covered.
    """

    def __init__(self, binary: Path, root: Path, size: int = 3, settings: Optional[dict] = None,
                 cli_node: Optional[int] = 3):
        self.root = Path(root)
        self.dirty: Optional[str] = None
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes: list[Node] = []
        for i in range(size):
            nid = i + 1
            self.nodes.append(Node(binary, self.root / f"node{nid}", nid, free_port(), cluster_ports[i], free_port(),
                                   [p for j, p in enumerate(cluster_ports) if j != i],
                                   cli_cluster=(nid == cli_node), settings=settings))

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    def init_databases(self, script: str) -> None:
        """Runs an application schema/data script on every database (before start)."""
        for n in self.nodes:
            n.executescript(script)

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        # All at once: JetStream needs a quorum of servers before any node is ready.
        for n in self.nodes:
            n.start(wait=False)
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.wait_started(max(1.0, deadline - time.monotonic()))

    def stop(self) -> list[str]:
        """Stops every running node gracefully; returns the problems seen (empty = clean)."""
        errors: list[str] = []

        def stop(n: Node) -> None:
            try:
                n.stop()
            except AssertionError as e:
                errors.append(str(e))

        # In parallel: each node's drain (lame-duck nats-server) takes seconds.
        threads = [threading.Thread(target=stop, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()

    def all_running(self) -> bool:
        return all(n.running for n in self.nodes)

    def dead_nodes(self) -> list[Node]:
        """Nodes that should be running but are not (crashed)."""
        return [n for n in self.nodes if n.expected_running and not n.running]

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(n.log_tail(lines) for n in self.nodes)

    # -- application helpers across nodes

    def exec_all(self, sql: str) -> None:
        for n in self.nodes:
            n.executescript(sql)

    def wait_for_triggers(self, tables: Iterable[str], nodes: Optional[Iterable[Node]] = None,
                          timeout: float = REPL_TIMEOUT) -> None:
        """Waits until harmonylite has capture triggers (insert, update, delete) on
        each table on each node: rows written before that are not captured."""
        for n in (nodes or self.nodes):
            for t in tables:
                wait_until(lambda: n.triggers_on(t) >= 3, timeout,
                           f"harmonylite triggers on table {t!r} on node {n.id}")

    def create_tables(self, sql: str, tables: Iterable[str]) -> None:
        """The application creates tables on every node; waits until they are captured."""
        tables = list(tables)
        self.exec_all(sql)
        self.wait_for_triggers(tables, [n for n in self.nodes if n.running])

    def wait_converged(self, tables: Optional[Iterable[str]] = None, nodes: Optional[list[Node]] = None,
                       timeout: float = SLOW_TIMEOUT) -> dict:
        """Waits until every node's dump of `tables` (default: all user tables) is
        identical; returns it. On timeout the message shows the differences."""
        nodes = nodes or self.nodes
        tables = list(tables) if tables is not None else None
        state: dict = {}

        def same() -> bool:
            dumps = [n.dump(tables) for n in nodes]
            state["dumps"] = dumps
            return all(d == dumps[0] for d in dumps[1:])

        try:
            wait_until(same, timeout, f"identical dumps of {tables or 'all tables'} on nodes "
                                      f"{[n.id for n in nodes]}", interval=0.5)
        except WaitTimeout as e:
            dumps = state.get("dumps") or []
            diffs = [dump_diff(dumps[0], d, f"node {nodes[0].id}", f"node {nodes[i].id}")
                     for i, d in enumerate(dumps) if i > 0 and d != dumps[0]]
            raise WaitTimeout(f"{str(e).split('; last seen')[0]}\n" + "\n".join(diffs)) from None
        return state["dumps"][0]


@contextlib.contextmanager
def started_cluster(binary: Path, root: Path, size: int = 3, settings: Optional[dict] = None,
                    schema: str = BOOKS_SCHEMA, timeout: float = REPL_TIMEOUT):
    """A cluster of its own for a test module: created with `schema` on every node,
    started, every node's /readyz 200; stopped afterwards, failing on an unclean stop."""
    import urllib.error
    import urllib.request

    def ready(n: Node) -> bool:
        try:
            with urllib.request.urlopen(n.http_url + "/readyz", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    c = Cluster(binary, root, size=size, settings=settings, cli_node=None)
    c.init_databases(schema)
    try:
        c.start()
        for n in c.nodes:
            wait_until(lambda: ready(n), timeout, f"node {n.id} ready")
        yield c
    finally:
        errors = c.stop()
        c.kill()
    assert not errors, "\n".join(errors)


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 (a network path a test can cut): cut() closes every
    connection and refuses new ones, as a partition does; heal() lets them through again.
    target_port may be set later, before the first connection."""

    def __init__(self, target_port: int = 0):
        self.target_port = target_port
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._open = True
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self._lock:
                if not self._open:
                    c.close()
                    continue
                try:
                    u = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                except OSError:
                    c.close()
                    continue
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._open = False
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def heal(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.lsock.close()


class DnsServer:
    """dnsmasq on 127.0.0.1 answering only from `records` (dnsmasq config lines such as
    "srv-host=_cluster._tcp.hl.test,n1.hl.test,6222" and "host-record=n1.hl.test,127.0.0.11").
    set_records() restarts it on the same port; stop() leaves the port unanswered."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # TCP checked free; UDP is checked by dnsmasq binding it
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_records(self, records: Iterable[str], timeout: float = 30) -> None:
        self.stop()
        conf = self.root / "dnsmasq.conf"
        conf.write_text(f"port={self.port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n"
                        "no-negcache\nlocal-ttl=0\n" + "".join(r + "\n" for r in records))
        with open(self.root / "dnsmasq.log", "ab") as log:
            self.proc = subprocess.Popen(["dnsmasq", "-k", "--user=root", "--pid-file=", f"--conf-file={conf}",
                                          "--log-facility=-"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, preexec_fn=_child_setup)

        def up() -> bool:
            assert self.proc.poll() is None, ("dnsmasq exited: "
                                              + (self.root / "dnsmasq.log").read_text(errors="replace")[-800:])
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(up, timeout, "dnsmasq listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None


class NatsServer:
    """A standalone nats-server with JetStream on loopback (for external mode)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        with open(self.root / "nats-server.log", "ab") as log:
            self.proc = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                          "-sd", str(self.root / "jetstream")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, preexec_fn=_child_setup)
        wait_until(lambda: not _port_is_free(self.port), timeout, f"nats-server listening on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- wire format

HEADER = struct.Struct(">4sBBHQQQIIQ")  # 48 bytes, docs/protocol.md
assert HEADER.size == 48
MAGIC = b"HLC1"
FLAG_ZSTD = 1
OP_UPSERT = 1
OP_DELETE = 2


def pack_header(origin: int, epoch: int, seq: int, index: int, count: int, total: int,
                flags: int = 0, version: int = 1, magic: bytes = MAGIC) -> bytes:
    return HEADER.pack(magic, version, flags, 0, origin, epoch, seq, index, count, total)


def unpack_header(data: bytes) -> dict:
    if len(data) < HEADER.size:
        raise ValueError(f"message of {len(data)} bytes is shorter than the header")
    magic, version, flags, _, origin, epoch, seq, index, count, total = HEADER.unpack_from(data)
    return {"magic": magic, "version": version, "flags": flags, "origin": origin, "epoch": epoch,
            "seq": seq, "index": index, "count": count, "total": total}


def msg_id(origin: int, epoch: int, seq: int, index: int) -> str:
    return f"{origin}-{epoch:016x}-{seq}-{index}"


def now_hlc() -> int:
    return int(time.time() * 1000) << 16


def encode_changeset(origin: int, epoch: int, seq: int, schema_hash: bytes, tables: list, rows: list,
                     hlc: Optional[int] = None) -> bytes:
    """CBOR payload: [1, origin, epoch, seq, hlc, wall_ms, schema_hash, tables, rows]."""
    import cbor2

    hlc = now_hlc() if hlc is None else hlc
    return cbor2.dumps([1, origin, epoch, seq, hlc, int(time.time() * 1000), schema_hash, tables, rows])


def build_messages(origin: int, epoch: int, seq: int, payload: bytes, chunk: int = 512 * 1024
                   ) -> list[tuple[bytes, str]]:
    """Splits an (uncompressed) payload into header-prefixed parts: [(data, msg id)]."""
    parts = [payload[i:i + chunk] for i in range(0, len(payload), chunk)] or [b""]
    return [(pack_header(origin, epoch, seq, i, len(parts), len(payload)) + p, msg_id(origin, epoch, seq, i))
            for i, p in enumerate(parts)]


_zstd = None


def zstd_decompress(data: bytes) -> bytes:
    """zstd frame -> bytes, through the system libzstd (no Python package needed)."""
    global _zstd
    if _zstd is None:
        lib = ctypes.CDLL(ctypes.util.find_library("zstd") or "libzstd.so.1")
        lib.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
        lib.ZSTD_getFrameContentSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.ZSTD_decompress.restype = ctypes.c_size_t
        lib.ZSTD_decompress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        _zstd = lib
    size = _zstd.ZSTD_getFrameContentSize(data, len(data))
    if size >= (1 << 64) - 2:  # unknown or error: decompress into a generous buffer
        size = 512 * 1024 * 1024
    dst = ctypes.create_string_buffer(max(int(size), 1))
    n = _zstd.ZSTD_decompress(dst, len(dst), data, len(data))
    if _zstd.ZSTD_isError(n):
        raise ValueError("zstd: cannot decompress payload")
    return dst.raw[:n]


def decode_payload(flags: int, payload: bytes) -> list:
    import cbor2

    if flags & FLAG_ZSTD:
        payload = zstd_decompress(payload)
    return cbor2.loads(payload)


# --------------------------------------------------------------------------- NATS


def run_nats(url: str, fn: Callable, timeout: float = 60.0) -> Any:
    """Runs `await fn(nc, js)` on a fresh NATS connection to url and returns its result."""
    import nats

    async def main():
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            return await fn(nc, nc.jetstream(timeout=10))
        finally:
            await nc.close()

    async def bounded():
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


def js_publish(url: str, messages: list[tuple[bytes, Optional[str]]], subject: str = SUBJECT,
               stream: str = STREAM) -> list[int]:
    """Publishes raw messages to JetStream, waiting for each ack; returns stream sequences."""

    async def fn(nc, js):
        seqs = []
        for data, mid in messages:
            headers = {"Nats-Msg-Id": mid} if mid else None
            ack = await js.publish(subject, data, stream=stream, headers=headers)
            seqs.append(ack.seq)
        return seqs

    return run_nats(url, fn)


def stream_messages(url: str, stream: str = STREAM, last: int = 500) -> list[tuple[int, bytes, dict]]:
    """The last `last` messages of a stream as (sequence, data, headers), oldest first."""
    from nats.js.errors import NotFoundError

    async def fn(nc, js):
        info = await js.stream_info(stream)
        first, last_seq = info.state.first_seq, info.state.last_seq
        out = []
        # An empty stream reports first = last = 0; sequence 0 is not a message (the server answers "bad request").
        for seq in range(max(first, last_seq - last + 1, 1), last_seq + 1):
            try:
                m = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            out.append((seq, m.data or b"", dict(m.headers or {})))
        return out

    return run_nats(url, fn)


def changesets_in_stream(url: str, stream: str = STREAM, last: int = 500) -> list[dict]:
    """Reassembles and decodes the complete changesets among the stream's last
    messages: [{origin, epoch, seq, flags, messages: [(data, msg id)], body: [...]}],
    oldest first. Messages that do not decode are ignored."""
    groups: dict[tuple, dict] = {}
    order = []
    for _, data, headers in stream_messages(url, stream, last):
        try:
            h = unpack_header(data)
        except ValueError:
            continue
        if h["magic"] != MAGIC:
            continue
        key = (h["origin"], h["epoch"], h["seq"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"origin": h["origin"], "epoch": h["epoch"], "seq": h["seq"], "flags": h["flags"],
                               "count": h["count"], "parts": {}, "ids": {}}
            order.append(key)
        g["parts"][h["index"]] = data[HEADER.size:]
        g["ids"][h["index"]] = headers.get("Nats-Msg-Id") or msg_id(h["origin"], h["epoch"], h["seq"], h["index"])
        g.setdefault("raw", {})[h["index"]] = data
    out = []
    for key in order:
        g = groups[key]
        if len(g["parts"]) != g["count"]:
            continue
        payload = b"".join(g["parts"][i] for i in range(g["count"]))
        try:
            g["body"] = decode_payload(g["flags"], payload)
        except Exception:  # noqa: BLE001 - not ours to judge here
            continue
        g["messages"] = [(g["raw"][i], g["ids"][i]) for i in range(g["count"])]
        out.append(g)
    return out


def sha256_hex(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()
