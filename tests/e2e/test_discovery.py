"""Peers from DNS (docs/nats.md, "Peers from DNS"), against a real DNS server.

dnsmasq on a loopback port serves a headless-service-like SRV name,
_cluster._tcp.hl.test, with one target per node; nodes listen for routes on
127.0.0.11, .12, ... with the same port, as pods of a StatefulSet would, and
know nothing but the SRV name (nats.discovery_resolver points them at dnsmasq).
The SRV targets are named like the addresses ("127.0.0.11"): nats-server
resolves route host names itself, through the system's resolver, which cannot
be pointed at the test's DNS server.

Each scenario runs with Debian's nats-server 2.9.10 and with a current release
(scripts/install-go-tools.sh; skipped, with the reason, only when it cannot be
built here).
"""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request

import pytest

import harness
from harness import REPL_TIMEOUT, Node, free_port, wait_until

SRV = "_cluster._tcp.hl.test"
INTERVAL = 1


@pytest.fixture(params=["2.9", "current"])
def nats_bin(request) -> str:
    if request.param == "2.9":
        return "nats-server"
    path, why = harness.current_nats_server()
    if path is None:
        pytest.skip(f"a current nats-server cannot be had here: {why}")
    return path


def cluster_port(hosts: list[str]) -> int:
    """A port free on every one of the loopback addresses."""
    for _ in range(200):
        p = free_port()
        ok = True
        for h in hosts:
            with socket.socket() as s:
                try:
                    s.bind((h, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return p
    raise RuntimeError("no port free on all of " + ", ".join(hosts))


def ip(i: int) -> str:
    return f"127.0.0.{10 + i}"


def records(ids: list[int], port: int) -> list[str]:
    return [f"srv-host={SRV},{ip(i)},{port}" for i in ids]


def routes(node: Node) -> list[str]:
    """The route URLs of the node's rendered nats-server config."""
    conf = node.data_dir / "nats" / "nats-server.conf"
    try:
        text = conf.read_text()
    except OSError:
        return []
    m = re.search(r"\n  routes: \[\n(.*?)\n  \]\n", text, re.S)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def ready(n: Node) -> bool:
    try:
        with urllib.request.urlopen(n.http_url + "/readyz", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def healthy(n: Node) -> bool:
    try:
        with urllib.request.urlopen(n.http_url + "/healthz", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def make_node(hl_bin, root, i: int, port: int, dns: harness.DnsServer, nats_bin: str, min_peers: int,
              extra: dict | None = None) -> Node:
    nats = {
        "server_bin": nats_bin,
        "cluster_addr": f"{ip(i)}:{port}",
        "cluster_peers": [f"dns+srv://{SRV}"],
        "discovery_resolver": dns.address,
        "discovery_interval": INTERVAL,
        "cluster_min_peers": min_peers,
    }
    nats.update(extra or {})
    n = Node(hl_bin, root / f"node{i}", i, free_port(), port, free_port(), [], settings={"nats": nats})
    n.executescript(harness.BOOKS_SCHEMA)
    return n


def count_books(n: Node, title: str) -> int:
    return n.scalar("SELECT count(*) FROM books WHERE title = ?", (title,))


def test_cluster_from_srv_records(hl_bin, tmp_path, nats_bin):
    dns = harness.DnsServer(tmp_path / "dns")
    port = cluster_port([ip(i) for i in range(1, 5)])
    nodes: list[Node] = []
    extra = {"sync_interval": "always"} if nats_bin != "nats-server" else {}
    try:
        dns.set_records(records([1, 2, 3], port))
        # A 3-pod StatefulSet starting in parallel: each waits for the other two.
        nodes = [make_node(hl_bin, tmp_path, i, port, dns, nats_bin, 2, extra) for i in (1, 2, 3)]
        for n in nodes:
            n.start(wait=False)
        for n in nodes:
            n.wait_started()
        for n in nodes:
            wait_until(lambda: ready(n), harness.STARTUP_TIMEOUT, f"node {n.id} ready")
        for n in nodes:
            others = sorted(f"nats://{ip(j)}:{port}" for j in (1, 2, 3) if j != n.id)
            assert sorted(routes(n)) == others, f"node {n.id}: own address left out"
        if extra:
            conf = (nodes[0].data_dir / "nats" / "nats-server.conf").read_text()
            assert 'sync_interval: "always"' in conf

        nodes[0].execute("INSERT INTO books (title, author) VALUES ('srv-1', 'a')")
        for n in nodes[1:]:
            wait_until(lambda: count_books(n, "srv-1") == 1, REPL_TIMEOUT, f"srv-1 on node {n.id}")

        # A 4th node's records: every node routes to it, it joins and replicates.
        dns.set_records(records([1, 2, 3, 4], port))
        n4 = make_node(hl_bin, tmp_path, 4, port, dns, nats_bin, 3, extra)
        nodes.append(n4)
        n4.start()
        url4 = f"nats://{ip(4)}:{port}"
        for n in nodes[:3]:
            wait_until(lambda: url4 in routes(n), REPL_TIMEOUT, f"node {n.id} routes to node 4")
        wait_until(lambda: ready(n4), harness.STARTUP_TIMEOUT, "node 4 ready")
        wait_until(lambda: count_books(n4, "srv-1") == 1, REPL_TIMEOUT, "srv-1 on node 4")
        n4.execute("INSERT INTO books (title, author) VALUES ('srv-4', 'a')")
        for n in nodes[:3]:
            wait_until(lambda: count_books(n, "srv-4") == 1, REPL_TIMEOUT, f"srv-4 on node {n.id}")

        # Node 2's records removed: the others' routes drop it.
        dns.set_records(records([1, 3, 4], port))
        url2 = f"nats://{ip(2)}:{port}"
        for n in (nodes[0], nodes[2], n4):
            wait_until(lambda: url2 not in routes(n) and routes(n), REPL_TIMEOUT, f"node {n.id} drops node 2")

        # The DNS server gone: the cluster keeps running on the last set, and
        # the failure is logged once, not once per interval.
        before = {n.id: routes(n) for n in nodes}
        # Counted from here: a round that ran while set_records() restarted
        # dnsmasq above failed too, and was rightly logged (then "answers again").
        mark = len(nodes[0].log_since_start())
        dns.stop()
        failed = "discovery: DNS lookup failed"
        wait_until(lambda: failed in nodes[0].log_since_start()[mark:], REPL_TIMEOUT, "lookup failure logged")
        nodes[0].execute("INSERT INTO books (title, author) VALUES ('srv-5', 'a')")
        for n in (nodes[2], n4):
            wait_until(lambda: count_books(n, "srv-5") == 1, REPL_TIMEOUT, f"srv-5 on node {n.id}")
        time.sleep(4 * INTERVAL)  # several more failed rounds
        assert nodes[0].log_since_start()[mark:].count(failed) == 1
        assert {n.id: routes(n) for n in nodes} == before

        # Routes changed by reloads, never by restarting nats-server.
        for n in nodes:
            assert n.log_since_start().count("nats-server started") == 1, n.log_tail()
            assert "nats-server died" not in n.log_since_start()
        assert any("nats-server config changed, reloading" in n.log_since_start() for n in nodes)
        errors = []
        for n in reversed(nodes):
            try:
                n.stop()
            except AssertionError as e:
                errors.append(str(e))
        assert not errors, "\n".join(errors)
    finally:
        for n in nodes:
            n.kill()
        dns.stop()


def test_a_records_and_min_peers(hl_bin, tmp_path, nats_bin):
    """dns://name:port (A records, HarmonyLite's form); a node that knows too few
    peers stays not ready and starts no nats-server until they appear."""
    dns = harness.DnsServer(tmp_path / "dns")
    port = cluster_port([ip(i) for i in range(1, 4)])
    nodes: list[Node] = []
    try:
        dns.set_records([f"host-record=nodes.hl.test,{ip(1)}"])
        extra = {"cluster_peers": [f"dns://nodes.hl.test:{port}"]}
        nodes = [make_node(hl_bin, tmp_path, i, port, dns, nats_bin, 2, extra) for i in (1, 2, 3)]
        nodes[0].start(wait=False)  # "started" comes once NATS is set up
        # Only itself in DNS: held, not ready, no nats-server.
        wait_until(lambda: "discovery: waiting for peers" in nodes[0].log_since_start(), REPL_TIMEOUT,
                   "waiting for peers logged")
        assert not ready(nodes[0])
        assert healthy(nodes[0]), "waiting for peers must not fail liveness"
        assert "nats-server started" not in nodes[0].log_since_start()
        dns.set_records([f"host-record=nodes.hl.test,{ip(i)}" for i in (1, 2, 3)])
        for n in nodes[1:]:
            n.start(wait=False)
        for n in nodes:
            n.wait_started()
        for n in nodes:
            wait_until(lambda: ready(n), harness.STARTUP_TIMEOUT, f"node {n.id} ready")
        for n in nodes:
            assert sorted(routes(n)) == sorted(f"nats://{ip(j)}:{port}" for j in (1, 2, 3) if j != n.id)
        nodes[2].execute("INSERT INTO books (title, author) VALUES ('a-1', 'a')")
        for n in nodes[:2]:
            wait_until(lambda: count_books(n, "a-1") == 1, REPL_TIMEOUT, f"a-1 on node {n.id}")
        errors = []
        for n in nodes:
            try:
                n.stop()
            except AssertionError as e:
                errors.append(str(e))
        assert not errors, "\n".join(errors)
    finally:
        for n in nodes:
            n.kill()
        dns.stop()
