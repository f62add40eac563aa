#!/usr/bin/env python3
"""big_txn.py - one very large application transaction through a local 3-node cluster.

Node 1's application commits ROWS rows in ONE transaction (default 5,000,000), from a
long-lived connection. The benchmark reports:

  - how long the commit took, next to the same transaction on a bare SQLite database
    (the ratio shows what the triggers cost on a bulk load);
  - the time from that commit until every row is visible on nodes 2 and 3, and the
    replicated rows/s that gives;
  - the peak resident memory (VmHWM) of every harmonylite process and of every
    nats-server child, which is the point: a transaction of any size travels as a chain
    of bounded changesets (docs/protocol.md §1.5), so harmonylite's memory does not grow
    with it.

Usage: bench/big_txn.py [--rows N] [--text-key] [--json FILE]
  --text-key   key the table by TEXT instead of INTEGER PRIMARY KEY, so every inserted
               row goes through the change log (the slower, logged path)

Needs HARMONYLITE_BIN (bench/run.sh --big sets it) and a few GB of free disk in $TMPDIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import harness  # noqa: E402


def schema(text_key: bool) -> str:
    key = "k TEXT PRIMARY KEY" if text_key else "k INTEGER PRIMARY KEY"
    return f"CREATE TABLE IF NOT EXISTS big({key}, a INTEGER, b TEXT);"


def insert_sql(rows: int, text_key: bool) -> str:
    k = "printf('key-%09d', i)" if text_key else "i"
    return (f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) "
            f"INSERT INTO big(k, a, b) SELECT {k}, i, 'row ' || i || ' of a bulk load' FROM n")


def one_transaction(conn: sqlite3.Connection, rows: int, text_key: bool) -> float:
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.execute(insert_sql(rows, text_key))
    conn.execute("COMMIT")
    return time.perf_counter() - t0


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes(cluster) -> dict[str, int]:
    """name -> pid of every harmonylite process and its nats-server child."""
    out = {}
    for n in cluster.nodes:
        out[f"harmonylite {n.id}"] = n.proc.pid
        for kid in harness.descendants(n.proc.pid):
            try:
                exe = os.readlink(f"/proc/{kid}/exe")
            except OSError:
                continue
            if "nats-server" in exe:
                out[f"nats-server {n.id}"] = kid
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--text-key", action="store_true")
    ap.add_argument("--cache-size", type=int, default=None, help="cache_size (KiB) of every node")
    ap.add_argument("--json", type=str, default=None)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="hl-big-") as tmp:
        root = Path(tmp)
        bare = sqlite3.connect(root / "bare.db", isolation_level=None)
        bare.executescript("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;" + schema(a.text_key))
        t_bare = one_transaction(bare, a.rows, a.text_key)
        bare.close()
        (root / "bare.db").unlink()

        settings = {"cache_size": a.cache_size} if a.cache_size else None
        cluster = harness.Cluster(harness.harmonylite_binary(), root / "cluster", size=3, settings=settings)
        cluster.init_databases(schema(a.text_key))
        cluster.start()
        procs = processes(cluster)
        try:
            n1, n2, n3 = cluster.nodes
            harness.wait_until(lambda: all(n.triggers_on("big") for n in cluster.nodes), 60, "triggers")
            conn = sqlite3.connect(n1.db_path, isolation_level=None, timeout=60)
            conn.execute("PRAGMA synchronous = NORMAL")
            t_app = one_transaction(conn, a.rows, a.text_key)
            committed = time.perf_counter()
            conn.close()
            print(f"committed {a.rows} rows in one transaction in {t_app:.1f} s "
                  f"(bare SQLite {t_bare:.1f} s, ratio {t_bare / t_app:.2f})", flush=True)

            done = {}

            def watch(node):
                c = sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True, timeout=60)
                while time.perf_counter() - committed < 3600:
                    try:
                        if c.execute("SELECT count(*) FROM big").fetchone()[0] == a.rows:
                            done[node.id] = time.perf_counter() - committed
                            break
                    except sqlite3.Error:
                        pass
                    time.sleep(0.5)
                c.close()

            watchers = [threading.Thread(target=watch, args=(n,)) for n in (n2, n3)]
            for w in watchers:
                w.start()
            last = 0.0
            while any(w.is_alive() for w in watchers):
                time.sleep(1)
                if time.perf_counter() - last > 30:
                    last = time.perf_counter()
                    rss = ", ".join(f"{k} {status_kib(p, 'VmRSS') // 1024} MiB" for k, p in procs.items())
                    print(f"  {time.perf_counter() - committed:6.0f} s: {rss}", flush=True)
            for w in watchers:
                w.join()
            peaks = {k: status_kib(p, "VmHWM") for k, p in procs.items()}
        finally:
            cluster.stop()
            cluster.kill()

    result = {"rows": a.rows, "text_key": a.text_key, "bare_s": t_bare, "app_s": t_app,
              "visible_s": done, "peak_rss_kib": peaks}
    print(f"\n{'what':<28} {'value':>14}")
    print(f"{'rows in the transaction':<28} {a.rows:>14,}")
    print(f"{'commit, with harmonylite':<28} {t_app:>12.1f} s")
    print(f"{'commit, bare SQLite':<28} {t_bare:>12.1f} s")
    for nid in (2, 3):
        if nid in done:
            print(f"{f'visible on node {nid}':<28} {done[nid]:>12.1f} s  ({a.rows / done[nid]:,.0f} rows/s)")
        else:
            print(f"{f'visible on node {nid}':<28} {'never':>14}")
    for k, v in peaks.items():
        print(f"{'peak RSS ' + k:<28} {v / 1024:>10.1f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0 if len(done) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
