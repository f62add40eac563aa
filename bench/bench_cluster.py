#!/usr/bin/env python3
"""bench_cluster.py - end-to-end replication benchmarks on a local 3-node cluster.

Measured in one run, on this machine, with real harmonylite and nats-server
processes (the e2e harness in tests/e2e/harness.py starts them):

  (b) throughput: node 1 commits ROWS rows in transactions of BATCH rows; the
      time from the first commit until every row is visible on nodes 2 and 3
      gives replicated rows/s. Bare SQLite insert speed for the same inserts,
      through the same Python driver, into a database without harmonylite, is
      reported next to it, and the CPU time (user + system) each process took
      meanwhile per replicated row: every harmonylite and nats-server process,
      and the writer.
  (b'') small transactions: the same with SMALL single-row transactions from
      one connection (synchronous = NORMAL), committed as fast as it can:
      replicated transactions/s, next to bare SQLite's single-row
      transactions/s with the same settings.
  (c) lag: node 1 commits single-row transactions at a fixed RATE per second
      for SECONDS; a separate process polls node 2 and notes when each row
      becomes visible. Reports p50/p99/max of commit -> visible.
  (d) isolated writes: node 1 commits ISOLATED single-row transactions from
      one long-lived connection (as an application with a connection pool
      does), one every 50-200 ms (random), so no later write comes to wake
      the engine; one process per other node notes when each row becomes
      visible there. Reports p50/p95/p99/max of commit -> visible on both
      nodes 2 and 3, first with the cluster's polling interval, then (d')
      with polling_interval 0 (inotify alone), where a missed wake-up shows
      as a row that never arrives ("missing").

At the end it prints the peak resident memory (VmHWM) of every harmonylite
and nats-server process through (b), (b''), (c) and (d).

Usage: bench/bench_cluster.py [--rows N] [--batch N] [--small N] [--rate N] [--seconds N]
                              [--isolated N] [--replicas N]   (JetStream replicas of the stream: 3 by default)
Prints a table and, with --json FILE, writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import harness  # noqa: E402
from bench_scattered import cpu_seconds, status_kib  # noqa: E402

SCHEMA = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c REAL);"


def rows_for(start: int, n: int):
    return [(start + i, start + i, "some text value of moderate size", (start + i) * 0.5) for i in range(n)]


def insert_batches(conn: sqlite3.Connection, total: int, batch: int, first: int = 1) -> float:
    """Inserts total rows (ids from first) in transactions of batch rows; returns elapsed seconds."""
    t0 = time.perf_counter()
    done = 0
    while done < total:
        n = min(batch, total - done)
        conn.execute("BEGIN")
        if n == 1:
            conn.execute("INSERT INTO t(id, a, b, c) VALUES (?, ?, ?, ?)", rows_for(first + done, 1)[0])
        else:
            conn.executemany("INSERT INTO t(id, a, b, c) VALUES (?, ?, ?, ?)", rows_for(first + done, n))
        conn.execute("COMMIT")
        done += n
    return time.perf_counter() - t0


def bare_sqlite(dirpath: Path, total: int, batch: int) -> float:
    db = dirpath / f"bare-{batch}.db"
    conn = harness.connect(db)
    conn.executescript(SCHEMA)
    if batch == 1:
        conn.execute("PRAGMA synchronous = NORMAL")  # see throughput()
    el = insert_batches(conn, total, batch)
    conn.close()
    return total / el


def has_all(conn: sqlite3.Connection, last: int) -> bool:
    """True once rows 1..last are all visible. Polls max(id), an index lookup, and
    confirms with count(*) only then: a count(*) of a 200,000-row table costs
    milliseconds, and polling with it every few ms on two nodes would take CPU
    from the very processes being measured."""
    if (conn.execute("SELECT max(id) FROM t").fetchone()[0] or 0) < last:
        return False
    return conn.execute("SELECT count(*) FROM t WHERE id BETWEEN 1 AND ?", (last,)).fetchone()[0] >= last


def cluster_pids(cluster) -> dict:
    """Every harmonylite process of the cluster and the nats-server each supervises."""
    pids = {}
    for n in cluster.nodes:
        pids[f"harmonylite {n.id}"] = n.proc.pid
        for kid in harness.descendants(n.proc.pid):
            pids[f"nats-server {n.id}"] = kid
    return pids


def throughput(cluster, total: int, batch: int, first: int = 1) -> dict:
    """(b), or (b'') with batch 1: rows first.. first + total - 1 (rows 1..first - 1
    already on every node) committed on node 1, until visible on nodes 2 and 3."""
    n1, n2, n3 = cluster.nodes
    pids = cluster_pids(cluster)
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    self0 = os.times()
    conn = n1.connect()
    if batch == 1:
        # Single-row commits with synchronous = FULL (the default) wait for an
        # fsync each and measure the disk; NORMAL, usual with WAL, does not.
        conn.execute("PRAGMA synchronous = NORMAL")
    t0 = time.perf_counter()
    insert_batches(conn, total, batch, first)
    t_written = time.perf_counter() - t0
    conn.close()
    readers = {n.id: sqlite3.connect(f"file:{n.db_path}?mode=ro", uri=True, timeout=10) for n in (n2, n3)}
    done = {}
    deadline = time.monotonic() + 600
    while len(done) < 2 and time.monotonic() < deadline:
        for n in (n2, n3):
            if n.id not in done and has_all(readers[n.id], first + total - 1):
                done[n.id] = time.perf_counter() - t0
        time.sleep(0.005)
    for r in readers.values():
        r.close()
    if len(done) < 2:
        raise SystemExit(f"rows did not replicate within 600 s: {done}")
    slowest = max(done.values())
    self1 = os.times()
    cpu_us = {k: (cpu_seconds(p) - cpu0[k]) / total * 1e6 for k, p in pids.items()}
    # The writer's own CPU (this process; its pollers too, a small part).
    cpu_us["writer (Python)"] = (self1.user + self1.system - self0.user - self0.system) / total * 1e6
    return {"rows": total, "batch": batch, "write_s": t_written, "written_rows_per_s": total / t_written,
            "replicated_s": slowest, "replicated_rows_per_s": total / slowest, "cpu_us_per_row": cpu_us}


def _poller(path: str, first_id: int, last_id: int, out: mp.Queue, limit_s: float = 120,
            pause_s: float = 0.0002) -> None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    seen = {}
    cur = first_id - 1
    deadline = time.monotonic() + limit_s
    while cur < last_id and time.monotonic() < deadline:
        row = conn.execute("SELECT max(id) FROM t").fetchone()[0] or 0
        if row > cur:
            now = time.time()
            for i in range(cur + 1, row + 1):
                seen[i] = now
            cur = row
        else:
            time.sleep(pause_s)
    out.put(seen)


def percentiles(lags: list[float]) -> dict:
    lags = sorted(lags)

    def pct(p_):
        return lags[min(len(lags) - 1, int(p_ * len(lags)))]

    return {"p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "max_ms": lags[-1]}


def warm_up(cluster, rid: int) -> None:
    """One row from node 1 seen on every other node: after a restart the
    JetStream cluster may still be electing stream leaders, and the first
    publishes wait for that; this is not what (d) measures."""
    cluster.nodes[0].execute("INSERT INTO t(id, a, b, c) VALUES (?, ?, 'warm-up', 0)", (rid, rid))
    for n in cluster.nodes[1:]:
        harness.wait_until(lambda n=n: n.query("SELECT 1 FROM t WHERE id = ?", (rid,)), 120,
                           f"warm-up row on node {n.id}", interval=0.05)


def isolated(cluster, count: int, start_id: int, seed: int) -> dict:
    """(d): count lone commits on one open connection of node 1, 50-200 ms apart."""
    rng = random.Random(seed)
    others = cluster.nodes[1:]
    limit = count * 0.2 + 30  # every row has at least 30 s to arrive
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_poller, args=(str(n.db_path), start_id, start_id + count - 1, q, limit, 0.0005))
             for n in others]
    for p in procs:
        p.start()
    time.sleep(0.5)
    conn = cluster.nodes[0].connect()
    conn.execute("PRAGMA synchronous = NORMAL")
    commits = {}
    for i in range(count):
        time.sleep(rng.uniform(0.05, 0.2))
        rid = start_id + i
        conn.execute("INSERT INTO t(id, a, b, c) VALUES (?, ?, 'isolated', 0)", (rid, rid))
        commits[rid] = time.time()
    conn.close()
    seens = [q.get(timeout=limit + 60) for _ in procs]
    for p in procs:
        p.join()
    # A row counts once it is visible on every other node.
    lags = [(max(s[i] for s in seens) - commits[i]) * 1000.0 for i in commits if all(i in s for s in seens)]
    if not lags:
        raise SystemExit("no isolated write became visible on the other nodes")
    return {"txns": count, "missing": count - len(lags), **percentiles(lags)}


def lag(cluster, rate: int, seconds: float, start_id: int) -> dict:
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    total = int(rate * seconds)
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=_poller, args=(str(n2.db_path), start_id, start_id + total - 1, q))
    p.start()
    time.sleep(0.5)
    conn = n1.connect()
    commits = {}
    t0 = time.perf_counter()
    for i in range(total):
        target = t0 + i / rate
        d = target - time.perf_counter()
        if d > 0:
            time.sleep(d)
        rid = start_id + i
        conn.execute("INSERT INTO t(id, a, b, c) VALUES (?, ?, 'lag', 0)", (rid, rid))
        commits[rid] = time.time()
    achieved = total / (time.perf_counter() - t0)
    conn.close()
    seen = q.get(timeout=180)
    p.join()
    lags = sorted((seen[i] - commits[i]) * 1000.0 for i in commits if i in seen)
    missing = total - len(lags)
    if not lags:
        raise SystemExit("no row became visible on node 2")

    def pct(p_):
        return lags[min(len(lags) - 1, int(p_ * len(lags)))]

    return {"rate": rate, "achieved_rate": achieved, "txns": total, "missing": missing,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lags[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--small", type=int, default=20000, help="single-row transactions in (b''); 0 skips it")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--isolated", type=int, default=200, help="lone writes in (d) and again in (d')")
    ap.add_argument("--replicas", type=int, default=3, help="JetStream replicas of the replication stream")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else time.time_ns() % 1_000_000_007
    binary = harness.harmonylite_binary()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: build first (scripts/build.sh release)")
    with tempfile.TemporaryDirectory(prefix="hl-bench-") as tmp:
        root = Path(tmp)
        bare = bare_sqlite(root, args.rows, args.batch)
        bare_small = bare_sqlite(root, args.small, 1) if args.small else 0.0
        cluster = harness.Cluster(binary, root / "cluster", settings={
            "http": {"bind": ""}, "replication_log": {"replicas": args.replicas}})
        cluster.init_databases(SCHEMA)
        try:
            cluster.start()
            tp = throughput(cluster, args.rows, args.batch)
            small = throughput(cluster, args.small, 1, args.rows + 1) if args.small else None
            first = args.rows + args.small + 1
            lg = lag(cluster, args.rate, args.seconds, first)
            next_id = first + lg["txns"]
            iso = isolated(cluster, args.isolated, next_id, seed)
            poll_ms = cluster.nodes[0].settings["polling_interval"]
            peak_rss = {k: status_kib(p, "VmHWM") for k, p in cluster_pids(cluster).items()}
            # (d'): the same with the fallback poll off, inotify alone.
            cluster.stop()
            for n in cluster.nodes:
                n.settings["polling_interval"] = 0
            cluster.start()
            warm_up(cluster, next_id + args.isolated)
            iso0 = isolated(cluster, args.isolated, next_id + args.isolated + 1, seed + 1)
        finally:
            cluster.stop()
    res = {"bare_sqlite_rows_per_s": bare, "throughput": tp, "lag": lg, "seed": seed, "replicas": args.replicas,
           "small": small, "bare_sqlite_small_txn_per_s": bare_small, "peak_rss_kib": peak_rss,
           "isolated": dict(iso, polling_interval_ms=poll_ms), "isolated_no_poll": iso0}
    print(f"(b) replicated node 1 -> nodes 2 and 3: {tp['replicated_rows_per_s']:,.0f} rows/s "
          f"({tp['rows']:,} rows, {tp['batch']} rows/txn, JetStream replicas {args.replicas}); bare SQLite insert: "
          f"{bare:,.0f} rows/s; ratio {tp['replicated_rows_per_s'] / bare:.2f}")
    print("    CPU µs per replicated row: " +
          "; ".join(f"{k} {v:.2f}" for k, v in tp["cpu_us_per_row"].items()) +
          f"; all {sum(tp['cpu_us_per_row'].values()):.2f}")
    if small:
        print(f"(b'') replicated single-row transactions node 1 -> nodes 2 and 3: "
              f"{small['replicated_rows_per_s']:,.0f} txn/s ({small['rows']:,} transactions from one connection, "
              f"committed at {small['written_rows_per_s']:,.0f} txn/s); bare SQLite: {bare_small:,.0f} txn/s; "
              f"ratio {small['replicated_rows_per_s'] / bare_small:.2f}")
        print("    CPU µs per replicated transaction: " +
              "; ".join(f"{k} {v:.2f}" for k, v in small["cpu_us_per_row"].items()) +
              f"; all {sum(small['cpu_us_per_row'].values()):.2f}")
    print(f"(c) commit -> visible on node 2 at {lg['achieved_rate']:.0f} txn/s for {lg['txns']} txns: "
          f"p50 {lg['p50_ms']:.1f} ms, p99 {lg['p99_ms']:.1f} ms, max {lg['max_ms']:.1f} ms"
          f"{'' if not lg['missing'] else ', missing ' + str(lg['missing'])}")
    for name, r, poll in (("(d) ", iso, f"polling_interval {poll_ms} ms"), ("(d')", iso0, "polling_interval 0")):
        print(f"{name} isolated writes (one every 50-200 ms, long-lived connection, {poll}), commit -> visible "
              f"on nodes 2 and 3, {r['txns']} txns: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms, missing {r['missing']}")
    print("peak RSS through (b), (b''), (c) and (d): " +
          "; ".join(f"{k} {v / 1024:.1f} MiB" for k, v in peak_rss.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
