#!/usr/bin/env python3
"""bench_scattered.py - scattered writes on a big table, and the size of the WAL.

Measured in one run, on this machine, with real harmonylite and nats-server
processes (a 3-node cluster started with tests/e2e/harness.py):

  (f) scattered updates: a table of ROWS rows (1,000,000 by default) is loaded
      on node 1 and replicated; then node 1 runs UPDATE transactions of BATCH
      rows at random keys for SECONDS. Reports the application's update rate,
      the rate replicated end to end (rows updated until a marker committed
      after the last batch is visible on nodes 2 and 3), and the -wal file of
      every node: its peak during the run and its size SETTLE seconds after the
      marker arrived. The same updates against a bare SQLite database (same
      driver, same settings, no harmonylite) give the bare rate and bare WAL
      sizes next to them. CPU per row: each harmonylite process's CPU time
      (user + system, from /proc/PID/stat; its nats-server child not
      included) from the start of the burst until the marker is visible,
      divided by the rows updated: node 1's is capture and publish (the
      sender), nodes 2 and 3's is fetch and apply (the receivers).
  (g) shuffled-id inserts: node 1 inserts INSERTS rows with ids in random order
      into an empty table in BATCH-row transactions; reports rows/s replicated
      to nodes 2 and 3, next to bare SQLite's insert rate for the same inserts.

At the end it prints the peak resident memory (VmHWM) of every harmonylite
process, and its resident memory at rest (VmRSS) after the settle time.

Usage: bench/bench_scattered.py [--rows N] [--batch N] [--seconds S] [--inserts N]
                                [--settle S] [--wal-size-limit BYTES] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import harness  # noqa: E402

SCHEMA = ("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c REAL);"
          "CREATE TABLE IF NOT EXISTS s(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c REAL);")
TEXT = "some text value of moderate size"
MARKER = -1


def load(conn: sqlite3.Connection, rows: int) -> None:
    for start in range(1, rows + 1, 10000):
        n = min(10000, rows + 1 - start)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t(id, a, b, c) VALUES (?, ?, ?, ?)",
                         [(i, i, TEXT, i * 0.5) for i in range(start, start + n)])
        conn.execute("COMMIT")


def update_burst(conn: sqlite3.Connection, rows: int, batch: int, seconds: float, seed: int) -> tuple[int, float]:
    """UPDATE transactions of batch random keys for seconds; returns (rows updated, elapsed s)."""
    rng = random.Random(seed)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        conn.execute("BEGIN")
        conn.executemany("UPDATE t SET a = a + 1, c = ? WHERE id = ?",
                         [(rng.random(), rng.randint(1, rows)) for _ in range(batch)])
        conn.execute("COMMIT")
        done += batch
    return done, time.perf_counter() - t0


def shuffled_inserts(conn: sqlite3.Connection, total: int, batch: int, seed: int) -> float:
    ids = list(range(1, total + 1))
    random.Random(seed).shuffle(ids)
    t0 = time.perf_counter()
    for i in range(0, total, batch):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO s(id, a, b, c) VALUES (?, ?, ?, ?)",
                         [(k, k, TEXT, k * 0.5) for k in ids[i:i + batch]])
        conn.execute("COMMIT")
    return time.perf_counter() - t0


def wal_size(db: Path) -> int:
    try:
        return os.stat(f"{db}-wal").st_size
    except FileNotFoundError:
        return 0


class WalSampler:
    """Samples the -wal file size of some databases every 50 ms in a thread."""

    def __init__(self, dbs: dict):
        self.dbs = dbs
        self.peak = {k: 0 for k in dbs}
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop_ev.is_set():
            for k, p in self.dbs.items():
                self.peak[k] = max(self.peak[k], wal_size(p))
            time.sleep(0.05)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_ev.set()
        self.th.join()


def connect(path: Path) -> sqlite3.Connection:
    conn = harness.connect(path)
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def bare(root: Path, rows: int, batch: int, seconds: float, inserts: int, seed: int, settle: float) -> dict:
    db = root / "bare.db"
    conn = connect(db)
    conn.executescript(SCHEMA)
    load(conn, rows)
    with WalSampler({"bare": db}) as ws:
        n, el = update_burst(conn, rows, batch, seconds, seed)
        ins_el = shuffled_inserts(conn, inserts, batch, seed)
        time.sleep(settle)
    res = {"updates_per_s": n / el, "wal_peak": ws.peak["bare"], "wal_final": wal_size(db),
           "inserts_per_s": inserts / ins_el}
    conn.close()
    return res


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process pid so far (its children not included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def visible(conn: sqlite3.Connection, sql: str, want) -> bool:
    try:
        return conn.execute(sql).fetchone()[0] == want
    except sqlite3.OperationalError:
        return False


def wait_on_others(cluster, sql: str, want, t0: float, limit: float = 900) -> float:
    readers = [sqlite3.connect(f"file:{n.db_path}?mode=ro", uri=True, timeout=10) for n in cluster.nodes[1:]]
    done: dict = {}
    deadline = time.monotonic() + limit
    while len(done) < len(readers) and time.monotonic() < deadline:
        for i, r in enumerate(readers):
            if i not in done and visible(r, sql, want):
                done[i] = time.perf_counter() - t0
        time.sleep(0.01)
    for r in readers:
        r.close()
    if len(done) < len(readers):
        raise SystemExit(f"not replicated within {limit} s")
    return max(done.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--inserts", type=int, default=200_000)
    ap.add_argument("--settle", type=float, default=15,
                    help="seconds after the burst before the final WAL size and the RSS at rest")
    ap.add_argument("--wal-size-limit", type=int, default=None, help="nodes' wal_size_limit (default: theirs)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else time.time_ns() % 1_000_000_007
    binary = harness.harmonylite_binary()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: build first (scripts/build.sh release)")
    settings: dict = {"http": {"bind": ""}, "replication_log": {"replicas": args.replicas}}
    if args.wal_size_limit:
        settings["wal_size_limit"] = args.wal_size_limit
    with tempfile.TemporaryDirectory(prefix="hl-bench-") as tmp:
        root = Path(tmp)
        b = bare(root, args.rows, args.batch, args.seconds, args.inserts, seed, args.settle)
        cluster = harness.Cluster(binary, root / "cluster", settings=settings)
        cluster.init_databases(SCHEMA)
        try:
            cluster.start()
            n1 = cluster.nodes[0]
            conn = connect(n1.db_path)
            t0 = time.perf_counter()
            load(conn, args.rows)
            wait_on_others(cluster, "SELECT count(*) FROM t", args.rows, t0)
            dbs = {f"node {n.id}": n.db_path for n in cluster.nodes}
            pids = {f"harmonylite {nd.id}": nd.proc.pid for nd in cluster.nodes if nd.proc}
            with WalSampler(dbs) as ws:
                cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                t0 = time.perf_counter()
                n, el = update_burst(conn, args.rows, args.batch, args.seconds, seed)
                conn.execute("INSERT INTO t(id, a, b, c) VALUES (?, 0, 'marker', 0)", (MARKER,))
                repl_s = wait_on_others(cluster, f"SELECT count(*) FROM t WHERE id = {MARKER}", 1, t0)
                cpu_us = {k: (cpu_seconds(p) - cpu0[k]) / n * 1e6 for k, p in pids.items()}
                t0 = time.perf_counter()
                ins_el = shuffled_inserts(conn, args.inserts, args.batch, seed)
                ins_repl_s = wait_on_others(cluster, "SELECT count(*) FROM s", args.inserts, t0)
                time.sleep(args.settle)
            conn.close()
            final = {k: wal_size(p) for k, p in dbs.items()}
            peak_rss = {k: status_kib(p, "VmHWM") for k, p in pids.items()}
            rest_rss = {k: status_kib(p, "VmRSS") for k, p in pids.items()}
        finally:
            cluster.stop()
    res = {"seed": seed, "rows": args.rows, "batch": args.batch, "bare": b,
           "updates": {"rows": n, "app_rows_per_s": n / el, "replicated_rows_per_s": n / repl_s,
                       "cpu_us_per_row": cpu_us, "sender_cpu_us_per_row": cpu_us.get("harmonylite 1", 0.0),
                       "receiver_cpu_us_per_row": sum(v for k, v in cpu_us.items() if k != "harmonylite 1") /
                       max(1, len(cpu_us) - 1)},
           "inserts": {"rows": args.inserts, "app_rows_per_s": args.inserts / ins_el,
                       "replicated_rows_per_s": args.inserts / ins_repl_s},
           "wal_peak": ws.peak, "wal_final": final, "peak_rss_kib": peak_rss, "rest_rss_kib": rest_rss}
    mib = 1 << 20
    print(f"(f) scattered updates, {args.batch}-row txns over {args.rows:,} rows for {args.seconds:.0f} s: "
          f"application {n / el:,.0f} rows/s (bare SQLite {b['updates_per_s']:,.0f}, ratio "
          f"{n / el / b['updates_per_s']:.2f}); replicated to nodes 2 and 3: {n / repl_s:,.0f} rows/s")
    print("    CPU per row updated (harmonylite process, user + system): " +
          "; ".join(f"{k} {v:.2f} µs" for k, v in cpu_us.items()) +
          " (1: capture and publish; 2, 3: fetch and apply)")
    print(f"    WAL peak / {args.settle:.0f} s after: bare SQLite {b['wal_peak'] / mib:.1f} / "
          f"{b['wal_final'] / mib:.1f} MiB; " +
          "; ".join(f"{k} {ws.peak[k] / mib:.1f} / {final[k] / mib:.1f} MiB" for k in dbs))
    print(f"(g) shuffled-id inserts, {args.inserts:,} rows: application {args.inserts / ins_el:,.0f} rows/s "
          f"(bare SQLite {b['inserts_per_s']:,.0f}); replicated to nodes 2 and 3: "
          f"{args.inserts / ins_repl_s:,.0f} rows/s")
    print("    RSS peak / at rest: " +
          "; ".join(f"{k} {peak_rss[k] / 1024:.1f} / {rest_rss[k] / 1024:.1f} MiB" for k in pids))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
