"""Last-writer-wins under abuse: forged clocks and rows clashing on a UNIQUE
index (docs/architecture.md, "Remote clocks are bounded" and "UNIQUE clashes")."""
from __future__ import annotations

import itertools
import time
import urllib.request

import cbor2

import harness
from harness import REPL_TIMEOUT, wait_until

INT64_MAX = (1 << 63) - 1


def schema_hash_of(cluster, table):
    """The schema hash from a genuine changeset of node 1 for table (all nodes share the schema)."""
    n1 = cluster.nodes[0]

    def find():
        for cs in reversed(harness.changesets_in_stream(n1.nats_url, last=200)):
            if cs["origin"] == n1.id and any(t[0] == table for t in cs["body"][7]):
                return cs["body"][6]
        return None

    return wait_until(find, REPL_TIMEOUT, f"node 1's changeset for {table} in the stream")


def metric(node, name):
    with urllib.request.urlopen(node.http_url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported by node {node.id}")


def test_far_future_version_does_not_poison_clocks(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE clocks_t (id INTEGER PRIMARY KEY, v TEXT)", ["clocks_t"])
    n1.execute("INSERT INTO clocks_t VALUES (1, 'genuine')")
    for n in (n2, n3):
        wait_until(lambda: n.query("SELECT v FROM clocks_t WHERE id = 1") == [("genuine",)], REPL_TIMEOUT,
                   f"row 1 on node {n.id}")
    schema_hash = schema_hash_of(cluster, "clocks_t")

    # One forged row with the greatest version an SQLite INTEGER can hold.
    tables = [["clocks_t", ["id", "v"], ["id"]]]
    payload = harness.encode_changeset(9201, 1, 1, schema_hash, tables,
                                       [[0, harness.OP_UPSERT, INT64_MAX, [1], [1, "forged"]]], INT64_MAX)
    harness.js_publish(n1.nats_url, harness.build_messages(9201, 1, 1, payload))

    # Every node's later writes still win everywhere (the stream is applied in
    # order: the forged changeset was seen before them).
    for i, n in enumerate(cluster.nodes):
        n.execute("UPDATE clocks_t SET v = ? WHERE id = 1", (f"update {i}",))
        for m in cluster.nodes:
            wait_until(lambda: m.query("SELECT v FROM clocks_t WHERE id = 1") == [(f"update {i}",)], REPL_TIMEOUT,
                       f"node {n.id}'s update on node {m.id}")
    n3.execute("DELETE FROM clocks_t WHERE id = 1")
    for m in cluster.nodes:
        wait_until(lambda: m.scalar("SELECT count(*) FROM clocks_t") == 0, REPL_TIMEOUT, f"delete on node {m.id}")
    for n in cluster.nodes:
        last = n.scalar("SELECT value FROM __harmonylite__meta WHERE key = 'last_hlc'")
        assert 0 < last < (harness.now_hlc() + (120_000 << 16)), f"node {n.id}: last_hlc {last}"
    cluster.wait_converged(["clocks_t"], timeout=REPL_TIMEOUT)
    # It is held, not applied and not lost, and counted.
    for n in cluster.nodes:
        wait_until(lambda: n.scalar("SELECT count(*) FROM __harmonylite__pending WHERE node = 9201") == 1,
                   REPL_TIMEOUT, f"forged changeset held on node {n.id}")
        assert metric(n, "harmonylite_clock_ahead_total") >= 1
    # The forged changeset stays held (and readiness reports it after a minute): start the next test afresh.
    cluster.dirty = "a forged changeset is held on every node"


def test_unique_clash_same_winner_in_every_arrival_order(cluster):
    n1, n2, n3 = cluster.nodes
    ddl = ("CREATE TABLE auth_origins (id TEXT PRIMARY KEY, user TEXT NOT NULL, provider TEXT NOT NULL, "
           "fingerprint TEXT, UNIQUE (user, provider))")
    cluster.create_tables(ddl, ["auth_origins"])
    n1.execute("INSERT INTO auth_origins VALUES ('seed', 'seed', 'seed', 'seed')")
    schema_hash = schema_hash_of(cluster, "auth_origins")
    tables = [["auth_origins", ["id", "user", "provider", "fingerprint"], ["id"]]]

    # Three rows for one (user, provider) per scenario, published in every order
    # of the six: each node sees each order. The greatest version must win.
    base = harness.now_hlc()
    msgs, winners, losers = [], {}, {}
    origin = 9300
    for s, order in enumerate(itertools.permutations(range(3))):
        user = f"user{s}"
        versions = [base + 10 * s + r for r in range(3)]
        winners[user] = f"{user}-r2"
        losers[user] = {f"{user}-r0", f"{user}-r1"}
        for r in order:
            origin += 1
            row = [0, harness.OP_UPSERT, versions[r], [f"{user}-r{r}"], [f"{user}-r{r}", user, "google", f"fp{r}"]]
            payload = harness.encode_changeset(origin, 1, 1, schema_hash, tables, [row], versions[r])
            msgs += harness.build_messages(origin, 1, 1, payload)
    harness.js_publish(n1.nats_url, msgs)

    expected = sorted([("seed",)] + [(w,) for w in winners.values()])
    for n in cluster.nodes:
        wait_until(lambda: n.query("SELECT id FROM auth_origins ORDER BY id") == expected, REPL_TIMEOUT,
                   f"winners on node {n.id}")

        def conflicts():
            got = {}
            for pk, in n.query("SELECT pk FROM __harmonylite__conflicts WHERE tbl = 'auth_origins'"):
                key = cbor2.loads(pk)[0]
                got.setdefault(key.split("-")[0], set()).add(key)
            return got

        # The winners can be in place before the last losers arrive (order 2, 1, 0): wait for those.
        wait_until(lambda: conflicts() == losers, REPL_TIMEOUT, f"exactly the losers recorded on node {n.id}")
    cluster.wait_converged(["auth_origins"], timeout=REPL_TIMEOUT)


def test_unique_clash_between_real_nodes_converges(cluster):
    """Each node inserts its own row for the same (user, provider) before it sees the others'."""
    n1, n2, n3 = cluster.nodes
    ddl = ("CREATE TABLE auth_first (id TEXT PRIMARY KEY, user TEXT NOT NULL, provider TEXT NOT NULL, "
           "UNIQUE (user, provider))")
    cluster.create_tables(ddl, ["auth_first"])
    # n2 and n3 are stopped: their applications write while nothing replicates to them.
    n2.stop()
    n3.stop()
    try:
        # A few ms apart, so the three versions differ by their wall clock part.
        n1.execute("INSERT INTO auth_first VALUES ('from-1', 'alice', 'github')")
        time.sleep(0.05)
        n2.execute("INSERT INTO auth_first VALUES ('from-2', 'alice', 'github')")
        time.sleep(0.05)
        n3.execute("INSERT INTO auth_first VALUES ('from-3', 'alice', 'github')")
    finally:
        n2.start()
        n3.start()
    # from-3 was written last: it has the greatest version.
    for n in cluster.nodes:
        wait_until(lambda: n.query("SELECT id FROM auth_first") == [("from-3",)], REPL_TIMEOUT,
                   f"the newest row on node {n.id}")
        wait_until(lambda: n.scalar("SELECT count(*) FROM __harmonylite__conflicts WHERE tbl = 'auth_first'") == 2,
                   REPL_TIMEOUT, f"the two losers recorded on node {n.id}")
    cluster.wait_converged(["auth_first"], timeout=REPL_TIMEOUT)
    # The winner's later changes replicate; the losers stay removed.
    n1.execute("UPDATE auth_first SET provider = 'gitlab' WHERE id = 'from-3'")
    wait_until(lambda: n2.query("SELECT provider FROM auth_first WHERE id = 'from-3'") == [("gitlab",)], REPL_TIMEOUT,
               "the update on node 2")
    n2.execute("INSERT INTO auth_first VALUES ('again-2', 'alice', 'github')")
    for n in cluster.nodes:
        wait_until(lambda: sorted(n.query("SELECT id, provider FROM auth_first")) ==
                   [("again-2", "github"), ("from-3", "gitlab")], REPL_TIMEOUT, f"later writes on node {n.id}")
    cluster.wait_converged(["auth_first"], timeout=REPL_TIMEOUT)
