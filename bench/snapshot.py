#!/usr/bin/env python3
"""snapshot.py - (f) snapshot and restore throughput and peak memory.

Builds a database of about --size-mb MiB (rows of 200 random bytes and 300
bytes of text: about 2.8:1 compressible), initialises harmonylite's tables in
it, then measures `-save-snapshot` and `-restore` on the `dir` store and, when
the S3 test server can be had (scripts/install-s3-server.sh), on `s3` (a
multipart upload with the default 64 MiB parts) — each next to `cp` + `zstd -3`
of the same file in the same run, and harmonylite's peak resident memory
(its VmHWM, sampled). Reports; asserts nothing.

  bench/snapshot.py [--size-mb 1024] [--keep-files]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import harness  # noqa: E402
from test_snapshot import S3Server  # noqa: E402


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS in KiB, output) of one child process.

    The peak is the process's own high-water mark (VmHWM, which exec resets),
    sampled every 10 ms until it exits: wait4's ru_maxrss would include the
    forked Python interpreter's memory from before the exec."""
    t0 = time.monotonic()
    log = tempfile.TemporaryFile()
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    hwm = 0
    while True:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except OSError:
            pass
        if p.poll() is not None:
            break
        time.sleep(0.01)
    secs = time.monotonic() - t0
    log.seek(0)
    out = log.read().decode(errors="replace")
    log.close()
    if p.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{out}")
    return secs, hwm, out


def make_db(path: Path, size_mb: int, binary: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB, w TEXT)")
    rows = size_mb * 1024 * 1024 // 560
    conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                 "INSERT INTO t SELECT x, randomblob(200), printf('%0300d', x) FROM c", (rows,))
    conn.commit()
    conn.close()
    # harmonylite's own tables, as a first start creates them (no NATS needed for this action)
    subprocess.run([str(binary), "-db-path", str(path), "-node-id", "1", "-drop-held", "1"], check=True,
                   capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args()
    binary = harness.harmonylite_binary()
    work = Path(tempfile.mkdtemp(prefix="hl-bench-snapshot-"))
    try:
        db = work / "app.db"
        make_db(db, args.size_mb, binary)
        size = db.stat().st_size
        mb = size / 1e6
        print(f"database: {size / 2**20:.0f} MiB")

        secs_cp, _, _ = run_measured(["cp", str(db), str(work / "copy.db")])
        secs_z, _, _ = run_measured(["zstd", "-q", "-3", "-f", str(work / "copy.db"), "-o", str(work / "copy.zst")])
        print(f"  cp + zstd -3:             {mb / (secs_cp + secs_z):7.1f} MB/s "
              f"(cp {secs_cp:.1f} s, zstd {secs_z:.1f} s, {(work / 'copy.zst').stat().st_size / 2**20:.0f} MiB)")
        for p in ("copy.db", "copy.zst"):
            (work / p).unlink()

        stores: list[tuple[str, list[str], dict]] = []
        (work / "dir").mkdir()
        stores.append(("dir", ["-snapshot-store", "dir", "-snapshot-dir", str(work / "dir")], dict(os.environ)))
        server = None
        r = subprocess.run(["bash", str(REPO / "scripts" / "install-s3-server.sh")], capture_output=True, text=True)
        if r.returncode == 0:
            server = S3Server(Path(r.stdout.strip().splitlines()[-1]), work)
            env = dict(os.environ, AWS_ACCESS_KEY_ID=S3Server.ACCESS, AWS_SECRET_ACCESS_KEY=S3Server.SECRET)
            stores.append(("s3", ["-snapshot-store", "s3", "-snapshot-s3-endpoint", server.endpoint,
                                  "-snapshot-s3-bucket", "snapshots", "-snapshot-s3-path-style", "true"], env))
        else:
            print(f"  s3: skipped, no S3 server: {r.stderr.strip()[-300:]}")
        try:
            for name, flags, env in stores:
                base = [str(binary), "-db-path", str(db), "-node-id", "1", *flags]
                secs, rss, _ = run_measured(base + ["-save-snapshot"], env)
                print(f"  {name:3} -save-snapshot:       {mb / secs:7.1f} MB/s ({secs:.1f} s), peak RSS {rss / 1024:.1f} MiB")
                target = work / f"restored-{name}.db"
                base = [str(binary), "-db-path", str(target), "-node-id", "2", *flags]
                secs, rss, _ = run_measured(base + ["-restore"], env)
                print(f"  {name:3} -restore:             {mb / secs:7.1f} MB/s ({secs:.1f} s), peak RSS {rss / 1024:.1f} MiB")
                target.unlink()
        finally:
            if server:
                server.stop()
    finally:
        if args.keep_files:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
