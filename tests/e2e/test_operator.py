"""The operator surface through real HTTP on running nodes: probes, metrics,
schema, logs and signals (docs/operations.md, docs/metrics.md)."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import harness
from harness import REPL_TIMEOUT, SLOW_TIMEOUT, wait_until

DOCS = Path(__file__).resolve().parents[2] / "docs"


def http(node, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str, dict]:
    """(status, body, headers) of one request; raises only when nothing answers."""
    req = urllib.request.Request(node.http_url + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def metrics(node) -> dict[str, list]:
    """Samples by name, parsed by the Prometheus project's own text parser."""
    code, body, headers = http(node, "/metrics")
    assert code == 200
    assert headers.get("Content-Type", "").startswith("text/plain; version=0.0.4")
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(node, name: str, **labels) -> float:
    for s in metrics(node).get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"metric {name}{labels} not exported by node {node.id}")


def test_probes_schema_and_errors(cluster):
    for n in cluster.nodes:
        code, body, _ = http(n, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        wait_until(lambda: http(n, "/readyz")[0] == 200, REPL_TIMEOUT, f"node {n.id} ready")
        ready = json.loads(http(n, "/readyz")[1])
        assert ready["ready"] is True
        names = {c["name"] for c in ready["checks"]}
        assert {"database", "triggers", "nats", "streams", "caught_up", "gap", "schema"} <= names
        assert all(c["ok"] for c in ready["checks"])

        code, body, _ = http(n, "/schema")
        assert code == 200
        schema = json.loads(body)
        assert schema["node_id"] == n.id
        assert re.fullmatch(r"[0-9a-f]{64}", schema["schema_hash"])
        books = [t for t in schema["tables"] if t["name"] == "books"]
        assert books and {c["name"] for c in books[0]["columns"]} >= {"id", "title", "author"}

        assert http(n, "/nope")[0] == 404
        code, _, headers = http(n, "/healthz", method="POST")
        assert code == 405 and "GET" in headers.get("Allow", "")
    # every node computes the same schema hash for the same schema
    assert len({json.loads(http(n, "/schema")[1])["schema_hash"] for n in cluster.nodes}) == 1


def test_metrics_move_when_rows_replicate(cluster):
    n1, n2 = cluster.node(1), cluster.node(2)
    captured0 = value(n1, "harmonylite_rows_captured_total", node_id="1")
    published0 = value(n1, "harmonylite_rows_published_total", node_id="1")
    applied0 = value(n2, "harmonylite_rows_applied_total", node_id="2")
    lag0 = value(n2, "harmonylite_replication_lag_seconds_count", node_id="2")

    conn = n1.connect()
    with harness.transaction(conn):
        conn.executemany("INSERT INTO books(title, author, publication_year) VALUES (?, 'metrics', 2000)",
                         [(f"metrics {i}",) for i in range(25)])
    conn.close()
    wait_until(lambda: n2.scalar("SELECT count(*) FROM books WHERE author = 'metrics'") == 25, REPL_TIMEOUT,
               "25 rows on node 2")
    wait_until(lambda: value(n2, "harmonylite_rows_applied_total", node_id="2") >= applied0 + 25, REPL_TIMEOUT,
               "rows_applied on node 2 moved by 25")
    assert value(n1, "harmonylite_rows_captured_total", node_id="1") >= captured0 + 25
    wait_until(lambda: value(n1, "harmonylite_rows_published_total", node_id="1") >= published0 + 25, REPL_TIMEOUT,
               "rows_published on node 1 moved by 25")
    assert value(n2, "harmonylite_replication_lag_seconds_count", node_id="2") >= lag0 + 1

    m = metrics(n2)
    # histogram: cumulative buckets, +Inf equals _count
    buckets = sorted(((float(s.labels["le"]), s.value) for s in m["harmonylite_replication_lag_seconds_bucket"]))
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert buckets[-1][0] == float("inf")
    assert buckets[-1][1] == m["harmonylite_replication_lag_seconds_count"][0].value
    assert m["harmonylite_nats_connected"][0].value == 1
    assert m["harmonylite_ready"][0].value == 1
    assert m["harmonylite_stream_applied_sequence"][0].labels["stream"] == harness.STREAM
    assert m["harmonylite_build_info"][0].labels["version"]
    assert all(s.labels.get("node_id") == "2" for samples in m.values() for s in samples)

    # every exported metric is documented
    doc = (DOCS / "metrics.md").read_text()
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in m}
    undocumented = [f for f in families if f not in doc]
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"


def test_readiness_goes_503_to_200_as_a_node_catches_up(cluster):
    n1, n2, n3 = cluster.nodes
    n3.stop()
    conn = n1.connect()
    for b in range(40):
        with harness.transaction(conn):
            conn.executemany("INSERT INTO books(title, author, publication_year) VALUES (?, 'catch-up', ?)",
                             [(f"catch-up {b}-{i}", i) for i in range(50)])
    conn.close()
    wait_until(lambda: n2.scalar("SELECT count(*) FROM books WHERE author = 'catch-up'") == 2000, SLOW_TIMEOUT,
               "2000 rows on node 2")

    n3.start(wait=False)
    seen = []
    deadline = time.monotonic() + SLOW_TIMEOUT
    while time.monotonic() < deadline:
        try:
            code, body, _ = http(n3, "/readyz", timeout=2)
        except OSError:
            time.sleep(0.02)
            continue
        seen.append(code)
        if code == 200:
            # ready means the backlog present at start is applied
            assert n3.scalar("SELECT count(*) FROM books WHERE author = 'catch-up'") == 2000
            break
        failing = [c["name"] for c in json.loads(body)["checks"] if not c["ok"]]
        assert failing, body
        time.sleep(0.02)
    assert seen and seen[-1] == 200, f"node 3 never became ready: {seen[-5:]}\n{n3.log_tail()}"
    assert 503 in seen, f"node 3 was never seen not ready: {seen[:5]}"
    n3.wait_started()


def test_not_ready_while_nats_is_gone_but_alive(tmp_path, hl_bin):
    nats = harness.NatsServer(tmp_path / "nats")
    nats.start()
    node = harness.Node(hl_bin, tmp_path / "node", 1, harness.free_port(), harness.free_port(), harness.free_port(),
                        [], external_urls=[nats.url],
                        settings={"replication_log": {"replicas": 1},
                                  "nats": {"reconnect_wait_seconds": 1}})
    node.executescript(harness.BOOKS_SCHEMA)
    try:
        node.start()
        wait_until(lambda: http(node, "/readyz")[0] == 200, REPL_TIMEOUT, "ready with NATS up")
        nats.stop()
        wait_until(lambda: http(node, "/readyz")[0] == 503, REPL_TIMEOUT, "not ready once NATS is gone")
        body = json.loads(http(node, "/readyz")[1])
        assert [c for c in body["checks"] if c["name"] == "nats" and not c["ok"]], body
        # liveness never depends on NATS in external mode
        assert http(node, "/healthz")[0] == 200
        # the application keeps writing; nothing is lost when NATS returns
        node.execute("INSERT INTO books(title, author) VALUES ('written while NATS was down', 'x')")
        nats.start()
        wait_until(lambda: http(node, "/readyz")[0] == 200, SLOW_TIMEOUT, "ready again once NATS is back")
        wait_until(lambda: value(node, "harmonylite_publish_backlog", node_id="1") == 0, SLOW_TIMEOUT,
                   "outbox flushed after NATS came back")
        node.stop()
    finally:
        node.kill()
        nats.stop()


def test_sigterm_during_write_stream_exits_0_and_loses_nothing(cluster):
    n1, n2, n3 = cluster.nodes
    written: list[int] = []
    stop = threading.Event()

    def writer():
        conn = n1.connect()
        i = 0
        while not stop.is_set():
            cur = conn.execute("INSERT INTO books(title, author) VALUES (?, 'sigterm')", (f"sigterm {i}",))
            written.append(cur.lastrowid)
            i += 1
            time.sleep(0.002)
        conn.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1.0)
        n1.stop()  # asserts exit status 0 within the stop timeout
        time.sleep(0.5)  # the application keeps writing while harmonylite is down
    finally:
        stop.set()
        t.join()
    n1.start()
    want = len(written)
    for n in (n2, n3):
        wait_until(lambda n=n: n.scalar("SELECT count(*) FROM books WHERE author = 'sigterm'") == want, SLOW_TIMEOUT,
                   f"all {want} rows on node {n.id}")
    assert n2.dump(["books"]) == n1.dump(["books"])


def test_json_logs_and_sighup_log_level(tmp_path, hl_bin):
    node = harness.Node(hl_bin, tmp_path / "node", 1, harness.free_port(), harness.free_port(), harness.free_port(),
                        [], settings={"replication_log": {"replicas": 1},
                                      "nats": {"cluster_addr": "", "cluster_peers": []},
                                      "logging": {"format": "json", "verbose": False, "level": "info"}})
    node.executescript(harness.BOOKS_SCHEMA)
    try:
        node.start()
        node.settings["logging"]["level"] = "debug"
        node.write_config()
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "log level changed" in node.log_since_start(), REPL_TIMEOUT, "SIGHUP logged")
        node.stop()
    finally:
        node.kill()
    lines = [ln for ln in node.log_since_start().splitlines() if ln.strip() and not ln.startswith("=== harness")]
    assert lines
    objs = [json.loads(ln) for ln in lines]  # every line, nats-server's included, is one JSON object
    for o in objs:
        assert {"time", "level", "msg", "node_id"} <= set(o), o
    assert any(o.get("component") == "nats-server" for o in objs)
    changed = [o for o in objs if o["msg"] == "SIGHUP: log level changed"]
    assert changed and changed[0]["from"] == "info" and changed[0]["to"] == "debug"


def test_check_config(tmp_path, hl_bin):
    import subprocess

    db = tmp_path / "never-created.db"
    good = tmp_path / "good.yaml"
    good.write_text(f"db_path: {db}\nnode_id: 4\nnats:\n  urls: [nats://127.0.0.1:4222]\n"
                    f"  user_name: app\n  user_password: s3cret-pass\n")
    r = subprocess.run([str(hl_bin), "-config", str(good), "-check-config"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert "configuration is valid" in r.stderr
    assert "s3cret-pass" not in r.stdout + r.stderr and "<redacted>" in r.stdout
    assert "node_id: 4" in r.stdout
    assert not db.exists(), "-check-config must not touch the database"

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"db_path: {db}\nnode_id: 4\nreplication_log:\n  shardz: 2\n")
    r = subprocess.run([str(hl_bin), "-config", str(bad), "-check-config"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert f"{bad}:4: replication_log.shardz: unknown key" in r.stderr, r.stderr
    assert not db.exists()


def _run_to_exit(argv: list[str], cwd: Path, timeout: float = 30) -> tuple[int, str]:
    """Runs harmonylite until it exits; (status, stderr+stdout). A process still running after a
    generous timeout is killed with its nats-server and reported as status None."""
    import os
    import subprocess

    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True, preexec_fn=harness._child_setup)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, out[-3000:]


# Configurations that parse but cannot work: the end of the file (after 4 lines of db_path,
# node_id, data_dir, polling_interval), and the line and key the error must name. The listeners
# a mistaken start would use are loopback ports of this test.
UNWORKABLE = {
    "replicas-above-embedded-servers": (
        "replication_log:\n  replicas: 3\nnats:\n  bind_address: 127.0.0.1:{client}\n"
        "http:\n  bind: 127.0.0.1:{http}\n", 6, "replication_log.replicas"),
    "http-bind-bad-port": (
        "nats:\n  bind_address: 127.0.0.1:{client}\nhttp:\n  bind: 127.0.0.1:99999\n", 8, "http.bind"),
    "bind-address-without-port": (
        "nats:\n  bind_address: 127.0.0.1\nhttp:\n  bind: 127.0.0.1:{http}\n", 6, "nats.bind_address"),
    "cluster-addr-without-peers": (
        "nats:\n  bind_address: 127.0.0.1:{client}\n  cluster_addr: 127.0.0.1:{cluster}\n"
        "http:\n  bind: 127.0.0.1:{http}\n", 7, "nats.cluster_addr"),
}


@pytest.mark.parametrize("case", sorted(UNWORKABLE))
def test_unworkable_config_exits_2(tmp_path, hl_bin, case):
    """-check-config and a plain start both refuse it: exit 2, "file:line: key:", nothing touched."""
    tail, line, key = UNWORKABLE[case]
    db = tmp_path / "app.db"
    cfg = tmp_path / "node.yaml"
    ports = {"client": harness.free_port(), "http": harness.free_port(), "cluster": harness.free_port()}
    cfg.write_text(f"db_path: {db}\nnode_id: 1\ndata_dir: {tmp_path / 'data'}\npolling_interval: 500\n"
                   + tail.format(**ports))
    want = f"{cfg}:{line}: {key}: "
    for extra_args in (["-check-config"], []):
        rc, out = _run_to_exit([str(hl_bin), "-config", str(cfg)] + extra_args, tmp_path)
        assert rc == 2, f"{extra_args}: exit {rc}, expected 2\n{cfg.read_text()}\n{out}"
        assert want in out, f"{extra_args}: expected {want!r} in:\n{out}"
        assert out.count("\n") < 20, out  # one error line, not a retry loop
        assert not db.exists(), "a configuration error must not touch the database"
        assert not (tmp_path / "data").exists()


def test_unworkable_config_from_flag_names_the_flag(tmp_path, hl_bin):
    db = tmp_path / "app.db"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"db_path: {db}\nnode_id: 1\nhttp:\n  bind: 127.0.0.1:{harness.free_port()}\n"
                   f"nats:\n  bind_address: 127.0.0.1:{harness.free_port()}\n")
    for extra_args in (["-check-config"], []):
        rc, out = _run_to_exit([str(hl_bin), "-config", str(cfg), "-replication-log-replicas", "3"] + extra_args,
                               tmp_path)
        assert rc == 2, f"{extra_args}: exit {rc}\n{out}"
        assert "flag -replication-log-replicas: replication_log.replicas: must not exceed" in out, out
        assert not db.exists()


def test_refused_stream_creation_is_logged_a_bounded_number_of_times(tmp_path, hl_bin):
    """A standalone external nats-server cannot hold a stream with 3 replicas: the node keeps retrying
    (the server may be reconfigured), stays not ready, and logs the refusal at most once per 5 s
    retry instead of in a tight loop."""
    nats = harness.NatsServer(tmp_path / "nats")
    node = harness.Node(hl_bin, tmp_path / "node", 1, 0, 0, harness.free_port(), [], external_urls=[nats.url],
                        settings={"replication_log": {"replicas": 3}})
    try:
        nats.start()
        node.start(wait=False)
        wait_until(lambda: "cannot create stream" in node.log_since_start(), SLOW_TIMEOUT, "the refusal logged")
        first = node.log_since_start().count("cannot create stream")
        window = 10.0
        time.sleep(window)  # observe the log for a while; nothing here is timed, only counted
        assert node.running, node.log_tail()
        log = node.log_since_start()
        n = log.count("cannot create stream") - first
        assert n <= window / 5 + 2, f"{n} 'cannot create stream' lines in {window:.0f} s:\n{node.log_tail(20)}"
        assert "replicas > 1 not supported in non-clustered mode" in log
        lines = [ln for ln in log.splitlines() if ln.strip()]
        assert len(lines) < 200, f"{len(lines)} log lines in {window:.0f} s:\n{node.log_tail(20)}"
        code, body, _ = http(node, "/readyz")
        assert code == 503, body
        node.stop()
    finally:
        node.kill()
        nats.stop()


def test_killed_nats_server_child_is_restarted_and_replication_resumes(cluster):
    import os

    n1, n2, n3 = cluster.nodes
    restarts0 = value(n2, "harmonylite_nats_server_restarts_total", node_id="2")
    kids = [p for p in harness.descendants(n2.proc.pid) if b"nats-server" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(kids) == 1, f"expected one nats-server child of node 2, found {kids}"
    os.kill(kids[0], signal.SIGKILL)
    wait_until(lambda: value(n2, "harmonylite_nats_server_restarts_total", node_id="2") == restarts0 + 1,
               REPL_TIMEOUT, "restart counted")
    wait_until(lambda: http(n2, "/healthz")[0] == 200, REPL_TIMEOUT, "node 2 live again")
    wait_until(lambda: http(n2, "/readyz")[0] == 200, SLOW_TIMEOUT, "node 2 ready again")
    # both directions work through the restarted server (explicit ids: AUTOINCREMENT would
    # give both rows the same key on two nodes, and last-writer-wins would keep one)
    n1.execute("INSERT INTO books(id, title, author) VALUES (9000001, 'after child restart, from 1', 'restart')")
    n2.execute("INSERT INTO books(id, title, author) VALUES (9000002, 'after child restart, from 2', 'restart')")
    for n in cluster.nodes:
        wait_until(lambda n=n: n.scalar("SELECT count(*) FROM books WHERE author = 'restart'") == 2, SLOW_TIMEOUT,
                   f"both rows on node {n.id}")
    assert n2.running


def test_second_stop_signal_exits_at_once_and_keeps_the_outbox(tmp_path, hl_bin):
    nats = harness.NatsServer(tmp_path / "nats")
    nats.start()
    node = harness.Node(hl_bin, tmp_path / "node", 1, harness.free_port(), harness.free_port(), harness.free_port(),
                        [], external_urls=[nats.url],
                        settings={"replication_log": {"replicas": 1}, "shutdown_grace": 30,
                                  "nats": {"reconnect_wait_seconds": 1}})
    node.executescript(harness.BOOKS_SCHEMA)
    try:
        node.start()
        nats.stop()
        wait_until(lambda: http(node, "/readyz")[0] == 503, REPL_TIMEOUT, "not ready once NATS is gone")
        node.execute("INSERT INTO books(id, title, author) VALUES (424242, 'kept in the outbox', 'x')")
        wait_until(lambda: value(node, "harmonylite_publish_backlog", node_id="1") >= 1, REPL_TIMEOUT,
                   "the change waits in the outbox")
        # the first signal starts a drain that waits up to shutdown_grace for NATS ...
        node.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping gracefully" in node.log_since_start(), REPL_TIMEOUT, "graceful stop began")
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)  # ... the second one does not wait
        rc = node.proc.wait(10)
        assert time.monotonic() - t0 < 5, "second signal did not exit at once"
        assert rc != 0
        node.expected_running = False
        assert "second stop signal" in node.log_since_start()
        # nothing lost: the changeset is still in the outbox and goes out once NATS is back
        assert node.scalar("SELECT count(*) FROM __harmonylite__outbox") >= 1
        nats.start()
        node.start()
        wait_until(lambda: value(node, "harmonylite_publish_backlog", node_id="1") == 0, SLOW_TIMEOUT,
                   "outbox flushed after restart")
        node.stop()
    finally:
        node.kill()
        nats.stop()
