"""End-to-end tests: real harmonylite processes, real nats-servers, real SQLite files.

Each test plays the application: it writes through its own SQLite connections
(WAL, busy timeout) and checks what the other nodes' applications see. The
scenarios cover HarmonyLite's e2e suite (tests/e2e/e2e_test.go in the Go
original) and go further: atomic visibility, concurrent writers, crashes,
hostile messages, -cleanup, live schema changes and exact types.

Tests run in file order on a shared cluster (see conftest.py); the ones that
leave the cluster in a special state come last and mark it dirty.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request

import cbor2
import pytest

import harness
from harness import REPL_TIMEOUT, SLOW_TIMEOUT, transaction, wait_until


def insert_book(node, title, author="Author", year=2020, book_id=None):
    if book_id is None:
        return node.execute("INSERT INTO books (title, author, publication_year) VALUES (?, ?, ?)",
                            (title, author, year))
    node.execute("INSERT INTO books (id, title, author, publication_year) VALUES (?, ?, ?, ?)",
                 (book_id, title, author, year))
    return book_id


def book(node, book_id):
    rows = node.query("SELECT title, author, publication_year FROM books WHERE id = ?", (book_id,))
    return rows[0] if rows else None


def wait_row(nodes, fetch, expected, what, timeout=REPL_TIMEOUT):
    """Waits until fetch(node) == expected on every node."""
    __tracebackhide__ = True
    for n in nodes:
        harness.wait_equal(lambda: fetch(n), expected, timeout, f"{what} on node {n.id}")


def count(node, table, where="1", params=()):
    return node.scalar(f"SELECT count(*) FROM {harness.quote_ident(table)} WHERE {where}", params)


# --------------------------------------------------------------------------- without a cluster


def test_version_flag(hl_bin):
    r = subprocess.run([str(hl_bin), "-version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).strip(), "-version printed nothing"


def test_config_error_names_file_line_and_key(hl_bin, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f'db_path: "{tmp_path / "x.db"}"\nnode_id: 1\nreplication_log:\n  shards: "many"\n')
    r = subprocess.run([str(hl_bin), "-config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, f"exit {r.returncode}, stderr:\n{r.stderr}"
    assert re.search(r"bad\.yaml:4: \S*shards\S*: expected", r.stderr), r.stderr

    cfg.write_text(f'db_path: "{tmp_path / "x.db"}"\nnode_id: 1\nnats:\n  no_such_key: 1\n')
    r = subprocess.run([str(hl_bin), "-config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, f"exit {r.returncode}, stderr:\n{r.stderr}"
    assert re.search(r"bad\.yaml:4: \S*no_such_key", r.stderr), r.stderr


# --------------------------------------------------------------------------- basics


def test_insert_update_delete_replicate(cluster):
    n1, n2, n3 = cluster.nodes
    bid = insert_book(n1, "Pride and Prejudice", "Jane Austen", 1813)
    wait_row([n2, n3], lambda n: book(n, bid), ("Pride and Prejudice", "Jane Austen", 1813), f"INSERT of book {bid}")

    n1.execute("UPDATE books SET title = ? WHERE id = ?", ("Updated Title", bid))
    wait_row([n2, n3], lambda n: book(n, bid), ("Updated Title", "Jane Austen", 1813), f"UPDATE of book {bid}")

    n1.execute("DELETE FROM books WHERE id = ?", (bid,))
    wait_row([n2, n3], lambda n: count(n, "books", "id = ?", (bid,)), 0, f"DELETE of book {bid}")

    cluster.wait_converged(["books"], timeout=REPL_TIMEOUT)


def test_last_writer_wins(cluster):
    n1, n2, n3 = cluster.nodes
    bid = insert_book(n1, "Conflict Test")
    wait_row([n2, n3], lambda n: count(n, "books", "id = ?", (bid,)), 1, f"INSERT of book {bid}")

    def update(node, title, delay):
        time.sleep(delay)
        node.execute("UPDATE books SET title = ? WHERE id = ?", (title, bid))

    threads = [threading.Thread(target=update, args=(n1, "Node1 Update", 0.0)),
               threading.Thread(target=update, args=(n2, "Node2 Update", 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    harness.wait_equal(lambda: [book(n, bid)[0] for n in cluster.nodes], ["Node2 Update"] * 3, REPL_TIMEOUT,
                       "the later write (node 2) to win on all nodes")
    cluster.wait_converged(["books"], timeout=REPL_TIMEOUT)


def test_multiple_tables(cluster):
    n1, n2, n3 = cluster.nodes
    bid = insert_book(n1, "Multi-Table Book", "Jane Austen", 1813)
    aid = n1.execute("INSERT INTO authors (name, birth_year) VALUES (?, ?)", ("Jane Austen", 1775))
    conn = n1.connect()
    with transaction(conn):
        bid2 = conn.execute("INSERT INTO books (title, author) VALUES ('Emma', 'Jane Austen')").lastrowid
        conn.execute("UPDATE authors SET birth_year = 1776 WHERE id = ?", (aid,))
    conn.close()
    wait_row([n2, n3], lambda n: book(n, bid), ("Multi-Table Book", "Jane Austen", 1813), f"book {bid}")
    wait_row([n2, n3], lambda n: book(n, bid2), ("Emma", "Jane Austen", None), f"book {bid2}")
    wait_row([n2, n3], lambda n: n.query("SELECT name, birth_year FROM authors WHERE id = ?", (aid,)),
             [("Jane Austen", 1776)], f"author {aid}")
    cluster.wait_converged(["books", "authors"], timeout=REPL_TIMEOUT)


def test_bulk_transaction_and_many_small_transactions(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE bulk (id INTEGER PRIMARY KEY, origin INTEGER NOT NULL, "
                          "n INTEGER NOT NULL, payload TEXT)", ["bulk"])
    conn = n1.connect()
    with transaction(conn):
        conn.executemany("INSERT INTO bulk VALUES (?, 1, ?, ?)",
                         [(i, i, f"bulk row {i} " + "x" * (i % 97)) for i in range(1, 1001)])
    conn.close()
    conn = n2.connect()
    for i in range(1, 1001):
        conn.execute("INSERT INTO bulk VALUES (?, 2, ?, ?)", (100_000 + i, i, f"single row {i}"))
    conn.close()
    for n in cluster.nodes:
        harness.wait_equal(lambda: count(n, "bulk"), 2000, SLOW_TIMEOUT, f"2000 rows in bulk on node {n.id}")
    cluster.wait_converged(["bulk"])


# --------------------------------------------------------------------------- consistency


def test_readers_never_see_half_a_transaction(cluster, seed):
    n1, n2, n3 = cluster.nodes
    rng = random.Random(seed)
    cluster.create_tables("CREATE TABLE atomic_t (id INTEGER PRIMARY KEY, batch INTEGER NOT NULL, pad TEXT)",
                          ["atomic_t"])
    violations: list[str] = []
    reads = {n2.id: 0, n3.id: 0}
    states: dict[int, set[int]] = {n2.id: set(), n3.id: set()}  # distinct row totals each reader saw
    stop = threading.Event()

    def reader(node):
        conn = node.connect()
        try:
            while not stop.is_set():
                try:
                    with transaction(conn, "DEFERRED"):
                        per_batch = conn.execute("SELECT batch, count(*) FROM atomic_t GROUP BY batch").fetchall()
                        total = conn.execute("SELECT count(*) FROM atomic_t").fetchone()[0]
                except sqlite3.OperationalError:
                    continue
                reads[node.id] += 1
                states[node.id].add(total)
                bad = [(b, c) for b, c in per_batch if c != 50]
                if bad or total != sum(c for _, c in per_batch):
                    violations.append(f"node {node.id} saw batches {bad} (total {total})")
                time.sleep(0.002)
        finally:
            conn.close()

    readers = [threading.Thread(target=reader, args=(n,), daemon=True) for n in (n2, n3)]
    for t in readers:
        t.start()
    conn = n1.connect()
    next_id = 1
    try:
        for b in range(1, 41):
            # Every 8th batch is big enough (~1.6 MB) to be split into several messages.
            pad_len = 32 * 1024 if b % 8 == 0 else 16
            with transaction(conn):
                for _ in range(50):
                    conn.execute("INSERT INTO atomic_t VALUES (?, ?, ?)",
                                 (next_id, b, os.urandom(pad_len // 2).hex()))
                    next_id += 1
            if b % 5 == 0:  # move a whole earlier batch to a new batch id in one transaction
                with transaction(conn):
                    conn.execute("UPDATE atomic_t SET batch = ? WHERE batch = ?", (1000 + b, b - 1))
            if b % 7 == 0:  # delete a whole batch in one transaction
                with transaction(conn):
                    conn.execute("DELETE FROM atomic_t WHERE batch = ?", (b - 2,))
            time.sleep(rng.uniform(0, 0.05))
    finally:
        conn.close()
    try:
        cluster.wait_converged(["atomic_t"])
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not violations, f"{len(violations)} partial transactions seen, e.g. {violations[:5]}"
    assert all(len(v) > 2 for v in states.values()), \
        f"the readers did not see replication in progress (reads {reads}, distinct totals {states})"


def write_from_every_node(cluster, seed: int, work) -> None:
    """Runs work(node, conn, rng) on every node at once, each in its own thread
    with its own connection and a seeded random generator; fails the test with
    every writer's exception."""
    errors: list[str] = []

    def run(node):
        conn = node.connect()
        try:
            work(node, conn, random.Random(seed * 10 + node.id))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"writer on node {node.id}: {e!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in cluster.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_concurrent_writers_converge(cluster, seed):
    cluster.create_tables("CREATE TABLE conc (id INTEGER PRIMARY KEY, v TEXT, n INTEGER, who INTEGER)", ["conc"])

    def writer(node, conn, rng):
        ops = 0
        while ops < 300:
            batch = rng.choice([1, 1, 1, 3])
            with transaction(conn):
                for _ in range(batch):
                    k = rng.randint(1, 50)
                    if rng.random() < 0.3:
                        conn.execute("DELETE FROM conc WHERE id = ?", (k,))
                    else:
                        conn.execute("INSERT INTO conc VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                                     "v = excluded.v, n = excluded.n, who = excluded.who",
                                     (k, f"node{node.id}-op{ops}", rng.randint(-10**12, 10**12), node.id))
                    ops += 1

    write_from_every_node(cluster, seed, writer)
    cluster.wait_converged(["conc"])


def test_appends_and_gap_filling_ids_converge(cluster, seed):
    """Inserts above a table's high-water mark are captured by rowid, without a
    log entry; explicit ids below it (gaps) are logged. Three nodes mixing
    appends, gap fills, updates and deletes at once end identical, every
    appended row present once."""
    cluster.create_tables("CREATE TABLE hw (id INTEGER PRIMARY KEY, v TEXT, who INTEGER)", ["hw"])
    appended: dict[int, list[str]] = {}

    def writer(node, conn, rng):
        mine = appended.setdefault(node.id, [])
        for op in range(400):
            with transaction(conn):
                r = rng.random()
                if r < 0.5:
                    # an append: the node's own id space keeps rows from colliding
                    tag = f"n{node.id}-{op}"
                    conn.execute("INSERT INTO hw(id, v, who) VALUES (?, ?, ?)",
                                 (node.id * 1_000_000 + op * 10 + 5, tag, node.id))
                    mine.append(tag)
                elif r < 0.7:
                    # mostly into the gaps just below this node's latest appends, where
                    # the high-water mark is about to move; sometimes anywhere
                    k = (node.id * 1_000_000 + rng.randint(max(0, op * 10 - 40), op * 10) if rng.random() < 0.8
                         else rng.randint(1, 3_000_000))
                    k += k % 10 == 5  # appends end in 5: never overwrite one
                    conn.execute("INSERT INTO hw(id, v, who) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                                 "v = excluded.v, who = excluded.who", (k, f"gap{node.id}-{op}", node.id))
                elif r < 0.9:
                    conn.execute("UPDATE hw SET v = v || '+' WHERE id = (SELECT id FROM hw ORDER BY random() "
                                 "LIMIT 1) AND v LIKE 'gap%'")
                else:
                    conn.execute("DELETE FROM hw WHERE id = (SELECT id FROM hw WHERE v LIKE 'gap%' "
                                 "ORDER BY random() LIMIT 1)")

    write_from_every_node(cluster, seed, writer)
    cluster.wait_converged(["hw"])
    for n in cluster.nodes:
        tags = [r[0] for r in n.query("SELECT v FROM hw WHERE v LIKE 'n%'")]
        for node_id, mine in appended.items():
            missing = set(mine) - set(tags)
            assert not missing, f"node {n.id} lacks appends of node {node_id}: {sorted(missing)[:5]}"
        assert len(tags) == len(set(tags)), f"node {n.id} has an append twice"


def test_vacuum_of_a_table_without_primary_key_converges(cluster):
    """A table without a declared primary key replicates by rowid, and VACUUM
    renumbers its rows (1, 2, 3 ... closing the gaps deletes left) without a
    trigger. Updates and deletes after it, on the node that vacuumed and on
    others, must reach the same rows everywhere: no ghost, no duplicate. Then
    two nodes vacuum at once."""
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE nokey (name TEXT NOT NULL, v INTEGER)", ["nokey"])
    expected = {f"k{i:02}": i for i in range(20)}
    conn = n1.connect()
    with transaction(conn):
        conn.executemany("INSERT INTO nokey(name, v) VALUES (?, ?)", expected.items())
    conn.close()
    cluster.wait_converged(["nokey"])
    gaps = [k for i, k in enumerate(sorted(expected)) if i % 3 == 1]
    n1.executescript("DELETE FROM nokey WHERE name IN (%s)" % ", ".join(f"'{k}'" for k in gaps))
    for k in gaps:
        del expected[k]
    cluster.wait_converged(["nokey"])

    def content(node):
        return dict(node.query("SELECT name, v FROM nokey"))

    def wait_content(what):
        for n in cluster.nodes:
            harness.wait_equal(lambda: content(n), expected, REPL_TIMEOUT, f"nokey after {what} on node {n.id}")
        cluster.wait_converged(["nokey"])

    n1.executescript("VACUUM")
    assert n1.scalar("SELECT max(rowid) = count(*) FROM nokey") == 1, "VACUUM did not renumber: test is void"
    n1.executescript("UPDATE nokey SET v = 1000 WHERE name = 'k18'; DELETE FROM nokey WHERE name = 'k14'")
    expected["k18"] = 1000
    del expected["k14"]
    for n in (n2, n3):
        wait_row([n], lambda n: n.query("SELECT v FROM nokey WHERE name = 'k18'"), [(1000,)], "the update after VACUUM")
    n2.executescript("UPDATE nokey SET v = 2000 WHERE name = 'k03'; DELETE FROM nokey WHERE name = 'k00';"
                     "INSERT INTO nokey(name, v) VALUES ('k20', 20)")
    n3.executescript("UPDATE nokey SET v = 3000 WHERE name = 'k06'")
    expected.update({"k03": 2000, "k06": 3000, "k20": 20})
    del expected["k00"]
    wait_content("VACUUM on node 1")

    # two nodes vacuum at once, with identical content: both publish it, and it converges
    n1.executescript("DELETE FROM nokey WHERE name IN ('k02', 'k09')")
    del expected["k02"], expected["k09"]
    wait_content("more deletes")
    n2.executescript("VACUUM")
    n3.executescript("VACUUM")
    cluster.wait_converged(["nokey"])
    n3.executescript("UPDATE nokey SET v = 4000 WHERE name = 'k12'; DELETE FROM nokey WHERE name = 'k15'")
    n1.executescript("UPDATE nokey SET v = 5000 WHERE name = 'k17'")
    expected["k12"], expected["k17"] = 4000, 5000
    del expected["k15"]
    wait_content("VACUUM on nodes 2 and 3")
    assert n1.scalar("SELECT count(*) FROM nokey") == len(expected)


def test_writes_after_a_rebuild_while_stopped_reach_the_others(cluster):
    """The usual SQLite migration rebuilds a table (new table, copy, drop,
    rename), which drops harmonylite's triggers with the old table. An
    application that migrates and writes while its harmonylite is stopped (or
    before it notices the new schema) must still see those inserts and deletes
    replicated once it runs."""
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER NOT NULL)", ["tags"])
    conn = n1.connect()
    with transaction(conn):
        conn.executemany("INSERT INTO tags VALUES (?, ?)", [(f"t{i}", i) for i in range(10)])
    cluster.wait_converged(["tags"])
    n1.stop()
    conn.executescript("BEGIN; CREATE TABLE tags_new (name TEXT PRIMARY KEY, n INTEGER NOT NULL, note TEXT);"
                       "INSERT INTO tags_new(name, n) SELECT name, n FROM tags; DROP TABLE tags;"
                       "ALTER TABLE tags_new RENAME TO tags; COMMIT")
    for n in (n2, n3):
        n.executescript("ALTER TABLE tags ADD COLUMN note TEXT")
    conn.execute("INSERT INTO tags VALUES ('after rebuild', 100, 'new')")
    conn.execute("DELETE FROM tags WHERE name = 't3'")
    n1.start()
    expected = {f"t{i}": i for i in range(10) if i != 3} | {"after rebuild": 100}
    for n in cluster.nodes:
        harness.wait_equal(lambda: dict(n.query("SELECT name, n FROM tags")), expected, REPL_TIMEOUT,
                           f"the writes after the rebuild on node {n.id}")
    cluster.wait_converged(["tags"])
    conn.close()


def test_trusted_schema_off(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE ts_t (id INTEGER PRIMARY KEY, v TEXT)", ["ts_t"])
    for node, base in ((n1, 0), (n2, 100)):
        conn = node.connect(trusted_schema=False)
        assert conn.execute("PRAGMA trusted_schema").fetchone()[0] == 0
        conn.execute("INSERT INTO ts_t VALUES (?, 'one')", (base + 1,))
        with transaction(conn):
            conn.execute("INSERT INTO ts_t VALUES (?, 'two')", (base + 2,))
            conn.execute("INSERT INTO ts_t VALUES (?, 'three')", (base + 3,))
        conn.execute("UPDATE ts_t SET v = 'ONE' WHERE id = ?", (base + 1,))
        conn.execute("DELETE FROM ts_t WHERE id = ?", (base + 3,))
        conn.close()
    conn = n3.connect(trusted_schema=False)
    bid = conn.execute("INSERT INTO books (title, author) VALUES ('Trusted', 'Schema')").lastrowid
    conn.close()
    expected = [(1, "ONE"), (2, "two"), (101, "ONE"), (102, "two")]
    wait_row(cluster.nodes, lambda n: n.query("SELECT id, v FROM ts_t ORDER BY id"), expected, "ts_t rows")
    wait_row(cluster.nodes, lambda n: book(n, bid), ("Trusted", "Schema", None), f"book {bid}")


# --------------------------------------------------------------------------- hostile input


def test_hostile_messages_are_refused(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE hostile_t (id INTEGER PRIMARY KEY, v TEXT)", ["hostile_t"])
    n1.execute("INSERT INTO hostile_t VALUES (1, 'genuine')")
    wait_row([n2, n3], lambda n: n.query("SELECT v FROM hostile_t WHERE id = 1"), [("genuine",)], "hostile_t row 1")

    # A real changeset of node 1 gives the current schema hash (all nodes have the same schema now).
    def genuine_changeset():
        for cs in reversed(harness.changesets_in_stream(n1.nats_url, last=200)):
            body = cs["body"]
            if cs["origin"] == n1.id and any(t[0] == "hostile_t" for t in body[7]):
                return cs
        return None

    genuine = wait_until(genuine_changeset, REPL_TIMEOUT, "node 1's changeset for hostile_t in the stream")
    body = genuine["body"]
    assert body[0] == 1 and body[1] == n1.id, f"unexpected changeset layout: {body[:6]!r}"
    schema_hash = body[6]
    assert isinstance(schema_hash, bytes) and len(schema_hash) == 32, f"schema hash: {schema_hash!r}"

    # Delete the row everywhere, so a replay of the old insert would be visible.
    n1.execute("DELETE FROM hostile_t WHERE id = 1")
    wait_row([n2, n3], lambda n: count(n, "hostile_t", "id = 1"), 0, "DELETE of hostile_t row 1")

    hlc = harness.now_hlc()
    books_cols = ["id", "title", "author", "publication_year"]
    msgs: list[tuple[bytes, str]] = []

    def changeset(origin, tables, rows):
        """Well-formed messages claiming our own schema hash (so unknown names are malformed, not 'newer')."""
        return harness.build_messages(origin, 1, 1,
                                      harness.encode_changeset(origin, 1, 1, schema_hash, tables, rows, hlc))

    msgs.append((os.urandom(300), "hostile-garbage"))
    msgs.append((b"HLC1\x01", "hostile-short"))
    msgs.append((harness.pack_header(9003, 1, 1, 0, 1, 100) + os.urandom(100), "hostile-bad-cbor"))
    cbor_ok = harness.encode_changeset(9004, 1, 1, schema_hash, [["hostile_t", ["id", "v"], ["id"]]],
                                       [[0, harness.OP_UPSERT, hlc, [666], [666, "bad version"]]], hlc)
    msgs.append((harness.pack_header(9004, 1, 1, 0, 1, len(cbor_ok), version=99) + cbor_ok, "hostile-version"))
    msgs.append((harness.pack_header(9005, 1, 1, 0, 1, len(cbor_ok), magic=b"XXXX") + cbor_ok, "hostile-magic"))
    msgs.append((harness.pack_header(9006, 1, 1, 0, 1, 1 << 40) + cbor_ok, "hostile-huge-length"))
    msgs.append((harness.pack_header(9007, 1, 1, 0, 2, 2 * len(cbor_ok)) + cbor_ok, "hostile-missing-part"))
    wrong_shape = cbor2.dumps({"tables": ["books"], "rows": [[0, 1]]})
    msgs.append((harness.pack_header(9008, 1, 1, 0, 1, len(wrong_shape)) + wrong_shape, "hostile-wrong-shape"))
    wrong_types = cbor2.dumps([1, "origin", -1, None, "hlc", 0, "hash", {}, "rows"])
    msgs.append((harness.pack_header(9014, 1, 1, 0, 1, len(wrong_types)) + wrong_types, "hostile-wrong-types"))
    msgs += changeset(9009, [["no_such_table", ["id", "v"], ["id"]]],
                      [[0, harness.OP_UPSERT, hlc, [1], [1, "x"]]])
    msgs += changeset(9010, [["books", books_cols[:2] + ["no_such_column"], ["id"]]],
                      [[0, harness.OP_UPSERT, hlc, [999_999], [999_999, "hostile", "x"]]])
    msgs += changeset(9011, [['books"; DROP TABLE books; --', ["id"], ["id"]]],
                      [[0, harness.OP_UPSERT, hlc, [1], [1]]])
    msgs += changeset(9012, [["books", ["id", 'title"; DROP TABLE books; --'], ["id"]]],
                      [[0, harness.OP_UPSERT, hlc, [999_998], [999_998, "x"]]])
    msgs += changeset(9013, [["hostile_t", ["id", "v"], ["id"]]],
                      [[7, harness.OP_UPSERT, hlc, [2], [2, "bad table index"]],
                       [0, 9, hlc, [3], [3, "bad op"]],
                       [0, harness.OP_UPSERT, hlc, [4], [4]]])
    # A replay of node 1's genuine insert (a new message id gets it past the
    # stream's duplicate window): already applied, so it must not resurrect the row.
    msgs += [(data, mid + "-replay") for data, mid in genuine["messages"]]
    harness.js_publish(n1.nats_url, msgs)

    # The stream is applied in order: once a later write arrives, every hostile message was seen.
    n1.execute("INSERT INTO hostile_t VALUES (100, 'after the hostile messages')")
    wait_row([n2, n3], lambda n: n.query("SELECT v FROM hostile_t WHERE id = 100"),
             [("after the hostile messages",)], "a normal write after the hostile messages")
    bid = insert_book(n1, "After hostile messages")
    wait_row([n2, n3], lambda n: book(n, bid), ("After hostile messages", "Author", 2020), f"book {bid}")

    for n in cluster.nodes:
        assert n.running, f"node {n.id} died on hostile input\n{n.log_tail()}"
        assert count(n, "books", "id IN (999999, 999998)") == 0, f"node {n.id} applied a hostile row"
        assert n.query("SELECT id FROM hostile_t ORDER BY id") == [(100,)], \
            f"node {n.id}: hostile_t has {n.query('SELECT id, v FROM hostile_t')}"
    cluster.wait_converged(["books", "hostile_t"], timeout=REPL_TIMEOUT)


# --------------------------------------------------------------------------- schema


def test_live_schema_changes(cluster):
    n1, n2, n3 = cluster.nodes
    for n in cluster.nodes:
        n.execute("ALTER TABLE books ADD COLUMN isbn TEXT")
    # Written right after the ALTER: harmonylite may not have seen the new column yet.
    early = n1.execute("INSERT INTO books (title, author, isbn) VALUES ('Early', 'A', '978-early')")
    n2.execute("INSERT INTO books (id, title, author, isbn) VALUES (3100001, 'From node 2', 'B', '978-node2')")

    def isbn(n, bid):
        return n.query("SELECT isbn FROM books WHERE id = ?", (bid,))

    wait_row([n2, n3], lambda n: count(n, "books", "id = ?", (early,)), 1, f"book {early}")
    late = n1.execute("INSERT INTO books (title, author, isbn) VALUES ('Late', 'A', '978-late')")
    wait_row([n2, n3], lambda n: isbn(n, late), [("978-late",)], f"isbn of book {late} (written after ALTER)")
    try:
        wait_row([n2, n3], lambda n: isbn(n, early), [("978-early",)], f"isbn of book {early}")
    except harness.WaitTimeout as e:
        raise AssertionError("a row written right after ALTER TABLE ADD COLUMN lost the new column's value "
                             "(the write raced harmonylite's trigger reinstall)\n" + str(e)) from None
    wait_row([n1, n3], lambda n: isbn(n, 3100001), [("978-node2",)], "isbn of node 2's book 3100001")

    cluster.create_tables("CREATE TABLE new_t (k TEXT PRIMARY KEY, v INTEGER)", ["new_t"])
    n1.execute("INSERT INTO new_t VALUES ('from-1', 1)")
    n3.execute("INSERT INTO new_t VALUES ('from-3', 3)")
    wait_row(cluster.nodes, lambda n: n.query("SELECT k, v FROM new_t ORDER BY k"),
             [("from-1", 1), ("from-3", 3)], "new_t rows")
    n3.execute("UPDATE books SET isbn = '978-updated' WHERE id = ?", (late,))
    wait_row([n1, n2], lambda n: isbn(n, late), [("978-updated",)], f"isbn update of book {late}")

    for n in cluster.nodes:
        n.execute("DROP TABLE new_t")
    after = n1.execute("INSERT INTO books (title, author, isbn) VALUES ('After DROP', 'C', '978-drop')")
    aid = n2.execute("INSERT INTO authors (id, name) VALUES (3200001, 'After DROP')")
    wait_row([n2, n3], lambda n: isbn(n, after), [("978-drop",)], f"book {after} after DROP TABLE")
    wait_row([n1, n3], lambda n: n.query("SELECT name FROM authors WHERE id = ?", (aid,)), [("After DROP",)],
             "author 3200001 after DROP TABLE")
    cluster.wait_converged(["books", "authors"], timeout=REPL_TIMEOUT)


TYPES_SCHEMA = """
CREATE TABLE t_text_pk (k TEXT PRIMARY KEY, v);
CREATE TABLE t_composite (a INTEGER NOT NULL, b TEXT NOT NULL, v, PRIMARY KEY (a, b));
CREATE TABLE t_without_rowid (k BLOB PRIMARY KEY, n INTEGER, v) WITHOUT ROWID;
CREATE TABLE t_no_key (x, y);
CREATE TABLE "my table" ("id" INTEGER PRIMARY KEY, "select" TEXT, "a""b" TEXT, "prénom" TEXT, "first name" TEXT);
CREATE TABLE "données" ("clé" TEXT PRIMARY KEY, "valeur");
CREATE TABLE t_strict (id INTEGER PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, a ANY) STRICT;
CREATE TABLE t_values (id INTEGER PRIMARY KEY, v);
"""
TYPES_TABLES = ["t_text_pk", "t_composite", "t_without_rowid", "t_no_key", "my table", "données", "t_strict",
                "t_values"]


def test_types_keys_and_identifiers(cluster, seed):
    n1, n2, n3 = cluster.nodes
    rng = random.Random(seed)
    cluster.create_tables(TYPES_SCHEMA, TYPES_TABLES)
    blob_1m = rng.randbytes(1 << 20)
    blob_16m = rng.randbytes(16 << 20)
    values = {
        1: None, 2: -(2 ** 63), 3: 2 ** 63 - 1, 4: 0, 5: 3.141592653589793, 6: -1.5e-300,
        7: 1.7976931348623157e308, 8: 5e-324, 9: -0.0,
        10: "héllo wörld — 🌍 中文 עברית \u202e", 11: "", 12: "nul\x00inside", 13: "1234",
        14: b"", 15: b"\x00\x01\xff", 16: blob_1m,
    }
    conn = n1.connect()
    with transaction(conn):
        conn.executemany("INSERT INTO t_values VALUES (?, ?)", list(values.items()))
        conn.executemany("INSERT INTO t_text_pk VALUES (?, ?)",
                         [("a", 1), ("b", 2.5), ("ü-key", "x"), ("", b"\x01"), ("with 'quote'", None)])
        conn.executemany("INSERT INTO t_composite VALUES (?, ?, ?)",
                         [(1, "x", "one-x"), (1, "y", "one-y"), (-(2 ** 63), "", "min"), (2 ** 63 - 1, "z", "max")])
        conn.executemany("INSERT INTO t_without_rowid VALUES (?, ?, ?)",
                         [(b"\x00", 1, "zero"), (b"\xff\xfe", 2, "ff"), (b"", 3, "empty")])
        conn.executemany("INSERT INTO t_no_key VALUES (?, ?)", [(1, "dup"), (1, "dup"), (2, "two"), (None, None)])
        conn.executemany('INSERT INTO "my table" VALUES (?, ?, ?, ?, ?)',
                         [(1, "sel'ect", 'q"uote', "Zoë", "Ada"), (2, None, "", "Ōsaka", "Bob")])
        conn.executemany('INSERT INTO "données" VALUES (?, ?)', [("clé-1", "valeur"), ("ключ", 42)])
        conn.executemany("INSERT INTO t_strict VALUES (?, ?, ?, ?, ?, ?)",
                         [(1, -(2 ** 63), 2.5, "text", b"\x00blob", 7), (2, None, None, None, None, "any")])
    with transaction(conn):
        conn.execute("INSERT INTO t_values VALUES (17, ?)", (blob_16m,))
    with transaction(conn):  # updates, key changes and deletes
        conn.execute("UPDATE t_text_pk SET v = 'updated' WHERE k = 'a'")
        conn.execute("UPDATE t_text_pk SET k = 'b2' WHERE k = 'b'")
        conn.execute("DELETE FROM t_text_pk WHERE k = 'ü-key'")
        conn.execute("UPDATE t_composite SET v = 'changed' WHERE a = 1 AND b = 'x'")
        conn.execute("UPDATE t_composite SET a = 2 WHERE a = 1 AND b = 'y'")
        conn.execute("DELETE FROM t_composite WHERE a = ?", (2 ** 63 - 1,))
        conn.execute("UPDATE t_without_rowid SET v = 'FF' WHERE k = x'fffe'")
        conn.execute("DELETE FROM t_without_rowid WHERE k = x''")
        conn.execute("UPDATE t_no_key SET y = 'dup-updated' WHERE rowid = 2")
        conn.execute("DELETE FROM t_no_key WHERE rowid = 3")
        conn.execute('UPDATE "my table" SET "select" = ?, "a""b" = ? WHERE "id" = 2', ("now set", "a\"b"))
        conn.execute('UPDATE "données" SET "valeur" = x\'00ff\' WHERE "clé" = \'ключ\'')
        conn.execute("UPDATE t_values SET id = 100 WHERE id = 4")
    conn.close()

    dump = cluster.wait_converged(TYPES_TABLES)
    for n in (n2, n3):
        got = dict(n.query("SELECT id, v FROM t_values WHERE id IN (16, 17)"))
        assert got.get(16) == blob_1m, f"1 MiB blob differs on node {n.id}"
        assert got.get(17) == blob_16m, f"16 MiB blob differs on node {n.id}"
    assert len(dump["t_values"][1]) == 17
    typed = {r[0][1]: r[1] for r in dump["t_values"][1]}
    assert typed[2] == ("integer", -(2 ** 63)) and typed[3] == ("integer", 2 ** 63 - 1)
    assert typed[13] == ("text", b"1234") and typed[12] == ("text", b"nul\x00inside")
    assert typed[1] == ("null", None) and typed[14] == ("blob", b"")


# --------------------------------------------------------------------------- HTTP


def test_http_endpoints(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    def get(url):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    for n in cluster.nodes:
        for path in ("/healthz", "/readyz"):
            harness.wait_equal(lambda: get(n.http_url + path)[0], 200, REPL_TIMEOUT, f"GET {path} on node {n.id}")
        status, text = get(n.http_url + "/metrics")
        assert status == 200, f"/metrics on node {n.id}: {status} {text[:500]}"
        families = list(text_string_to_metric_families(text))
        assert families, f"/metrics on node {n.id} has no metric"


# --------------------------------------------------------------------------- restarts and crashes


def test_stopped_node_catches_up(cluster):
    n1, n2, n3 = cluster.nodes
    # Written on node 3 just before it stops: must still leave node 3, now or after the restart.
    insert_book(n3, "Written just before stop", book_id=3_000_001)
    n3.stop()
    ids = [insert_book(n1, f"While node 3 is down {i}") for i in range(20)]
    n1.execute("UPDATE books SET title = 'Updated while down' WHERE id = ?", (ids[3],))
    n1.execute("DELETE FROM books WHERE id = ?", (ids[5],))
    wait_row([n2], lambda n: book(n, ids[-1]), ("While node 3 is down 19", "Author", 2020), f"book {ids[-1]}")
    n3.start()
    cluster.wait_converged(["books"])
    assert book(n1, 3_000_001) is not None


def test_whole_cluster_restart(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.create_tables("CREATE TABLE restart_t (id INTEGER PRIMARY KEY, v TEXT)", ["restart_t"])
    conn = n1.connect()
    conn.executemany("INSERT INTO restart_t VALUES (?, ?)", [(i, f"before {i}") for i in range(1, 11)])
    conn.close()
    cluster.wait_converged(["restart_t"], timeout=REPL_TIMEOUT)
    errors = cluster.stop()
    assert not errors, "\n".join(errors)
    # The applications keep writing while every harmonylite is down.
    conn = n1.connect()
    conn.executemany("INSERT INTO restart_t VALUES (?, ?)", [(i, f"down {i}") for i in range(11, 21)])
    conn.close()
    conn = n2.connect()
    conn.executemany("INSERT INTO restart_t VALUES (?, ?)", [(i, f"down {i}") for i in range(1011, 1021)])
    conn.close()
    n3.execute("UPDATE restart_t SET v = 'updated while down' WHERE id = 1")
    cluster.start()
    n1.execute("INSERT INTO restart_t VALUES (21, 'after restart')")
    dump = cluster.wait_converged(["restart_t"])
    assert len(dump["restart_t"][1]) == 31
    assert n1.query("SELECT v FROM restart_t WHERE id = 1") == [("updated while down",)]


def test_sigkill_node2_repeatedly_during_writes(cluster, seed):
    n1, n2, n3 = cluster.nodes
    rng = random.Random(seed)
    cluster.create_tables("CREATE TABLE crash_t (id INTEGER PRIMARY KEY, origin INTEGER NOT NULL, "
                          "n INTEGER NOT NULL, note TEXT)", ["crash_t"])
    stop = threading.Event()
    written: dict[int, set[int]] = {n1.id: set(), n2.id: set()}
    errors: list[str] = []

    def writer(node, base, wrng):
        conn = node.connect()
        i = 0
        try:
            while not stop.is_set():
                try:
                    with transaction(conn):
                        k = wrng.choice([1, 1, 1, 1, 5])
                        new = list(range(base + i, base + i + k))
                        for rid in new:
                            conn.execute("INSERT INTO crash_t VALUES (?, ?, 0, ?)", (rid, node.id, f"row {rid}"))
                        if written[node.id] and wrng.random() < 0.2:
                            conn.execute("UPDATE crash_t SET n = n + 1 WHERE id = ?",
                                         (base + wrng.randrange(i),))
                except sqlite3.OperationalError as e:
                    if "locked" in str(e) or "busy" in str(e):
                        continue
                    raise
                written[node.id].update(new)
                i += k
                time.sleep(0.01)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"writer on node {node.id}: {e!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(n1, 1_000_000, random.Random(seed + 1)), daemon=True),
               threading.Thread(target=writer, args=(n2, 2_000_000, random.Random(seed + 2)), daemon=True)]
    for t in threads:
        t.start()
    try:
        for _ in range(4):
            time.sleep(rng.uniform(0.3, 3.0))  # sometimes during startup, sometimes while running
            if not n2.running:
                raise AssertionError(f"node 2 exited on its own (status {n2.proc.returncode}) after a "
                                     f"restart\n{n2.log_tail()}")
            n2.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            n2.start(wait=False)
        time.sleep(rng.uniform(0.5, 2.0))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    n2.wait_started()
    expected = written[n1.id] | written[n2.id]
    assert len(written[n1.id]) > 0 and len(written[n2.id]) > 0
    for n in cluster.nodes:
        harness.wait_equal(lambda: {r[0] for r in n.query("SELECT id FROM crash_t")}, expected, SLOW_TIMEOUT,
                           f"all {len(expected)} written rows on node {n.id}")
    cluster.wait_converged(["crash_t"])
    assert all(count(n, "crash_t") == len(expected) for n in cluster.nodes)


# --------------------------------------------------------------------------- special configurations (last)


def test_publish_false_node(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.dirty = "node 2 was reconfigured with publish=false"
    n2.restart({"publish": False})
    insert_book(n2, "No Publish Test", book_id=5_000_001)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for n in (n1, n3):
            assert count(n, "books", "id = 5000001") == 0, f"node 2 published with publish=false (seen on node {n.id})"
        time.sleep(0.25)
    bid = insert_book(n1, "Publish Test")
    wait_row([n2, n3], lambda n: book(n, bid), ("Publish Test", "Author", 2020), f"book {bid} on a publish=false node")


def test_replicate_false_node(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.dirty = "node 2 was reconfigured with replicate=false"
    n2.restart({"replicate": False})
    bid = insert_book(n1, "Not applied on node 2", book_id=5_100_001)
    wait_row([n3], lambda n: book(n, bid), ("Not applied on node 2", "Author", 2020), f"book {bid} on node 3")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert count(n2, "books", "id = 5100001") == 0, "node 2 applied a change with replicate=false"
        time.sleep(0.25)
    own = insert_book(n2, "Sent by a replicate=false node", book_id=5_100_002)
    wait_row([n1, n3], lambda n: book(n, own), ("Sent by a replicate=false node", "Author", 2020),
             f"book {own} from a replicate=false node")


def test_cleanup_removes_harmonylite_objects(cluster):
    n1, n2, n3 = cluster.nodes
    cluster.dirty = "node 3 was cleaned up"
    bid = insert_book(n1, "Before cleanup")
    wait_row([n3], lambda n: book(n, bid), ("Before cleanup", "Author", 2020), f"book {bid}")
    n3.stop()
    conn = n3.connect()
    # The application's own trigger and index must survive -cleanup.
    conn.execute("CREATE INDEX app_books_title ON books (title)")
    conn.execute("CREATE TRIGGER app_books_touch AFTER UPDATE ON books BEGIN SELECT 1; END")
    assert harness.internal_objects(conn), "node 3 has no __harmonylite__ objects to clean up"
    schema_before = harness.app_schema(conn)
    conn.close()
    dump_before = n3.dump()

    r = subprocess.run(n3.argv("-cleanup"), capture_output=True, text=True, timeout=120, cwd=n3.root)
    assert r.returncode == 0, f"-cleanup exited {r.returncode}\n{r.stdout}\n{r.stderr}"

    conn = n3.connect()
    left = harness.internal_objects(conn)
    schema_after = harness.app_schema(conn)
    conn.close()
    assert not left, f"-cleanup left {left}"
    assert schema_after == schema_before
    dump_after = n3.dump()
    assert dump_after == dump_before, harness.dump_diff(dump_before, dump_after, "before", "after")


def test_external_nats_mode(hl_bin, tmp_path):
    """nats.urls set: the nodes use an existing NATS server instead of starting their own."""
    server = harness.NatsServer(tmp_path / "nats")
    nodes = [harness.Node(hl_bin, tmp_path / f"node{i}", i, 0, 0, harness.free_port(), [],
                          external_urls=[server.url],
                          settings={"replication_log": {"replicas": 1},
                                    "logging": {"format": "json" if i == 2 else "console"}})
             for i in (1, 2)]
    try:
        server.start()
        for n in nodes:
            n.executescript(harness.BOOKS_SCHEMA)
            n.start(wait=False)
        for n in nodes:
            n.wait_started()
        n1, n2 = nodes
        bid = insert_book(n1, "External NATS")
        wait_row([n2], lambda n: book(n, bid), ("External NATS", "Author", 2020), f"book {bid}")
        n2.execute("UPDATE books SET title = 'External NATS 2' WHERE id = ?", (bid,))
        wait_row([n1], lambda n: book(n, bid), ("External NATS 2", "Author", 2020), f"update of book {bid}")
        for n in nodes:
            n.stop()
    finally:
        for n in nodes:
            n.kill()
        server.stop()


def test_demo_script(hl_bin):
    """examples/run-cluster.sh --non-interactive (the demo) works end to end."""
    busy = [p for p in (14221, 14222, 14223, 16221, 16222, 16223, 18081, 18082, 18083)
            if not harness._port_is_free(p)]
    if busy and os.environ.get("CI"):
        pytest.fail(f"the demo's fixed ports {busy} are in use: the demo cannot be tested", pytrace=False)
    if busy:
        pytest.skip(f"the demo's fixed ports {busy} are in use (a demo cluster is running?)")
    env = dict(os.environ, HARMONYLITE_BIN=str(hl_bin), CI="true")
    r = subprocess.run(["bash", str(harness.REPO_ROOT / "examples" / "run-cluster.sh"), "--non-interactive"],
                       capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"demo exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "arrived" in r.stdout and "stopped cleanly" in r.stdout, r.stdout
