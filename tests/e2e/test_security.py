"""Who may write the change streams (docs/security.md), on a 2-node cluster of its own
whose embedded servers require harmonylite's login and a route secret.

An anonymous client, a client with a wrong password, a client with the read-only
credentials, and a rogue nats-server on the cluster port each try to put a forged
changeset on the change subject: none is applied, and each attempt shows in the log.
The nodes themselves keep replicating, and no secret appears in their output.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import time
from urllib.parse import quote

import pytest

import harness
from harness import REPL_TIMEOUT, wait_until
from test_operator import http

NODE_USER, NODE_PASSWORD = "hl-node", "node-Pa55w0rd-x"
READER_USER, READER_PASSWORD = "reader", "reader-Pa55w0rd-y"
ROUTE_PASSWORD = "route-S3cret:z/"
SECRETS = (NODE_PASSWORD, READER_PASSWORD, ROUTE_PASSWORD)
SETTINGS = {
    "replication_log": {"replicas": 2},
    "nats": {"user_name": NODE_USER, "user_password": NODE_PASSWORD, "reader_user": READER_USER,
             "reader_password": READER_PASSWORD, "cluster_password": ROUTE_PASSWORD},
}
BOOKS = [["books", ["id", "title", "author", "publication_year"], ["id"]]]


@pytest.fixture(scope="module")
def pair(hl_bin, tmp_path_factory):
    with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("security"), size=2, settings=SETTINGS) as c:
        yield c


def url_with(node, user: str, password: str) -> str:
    return f"nats://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{node.client_port}"


def forged(node, book_id: int) -> list[tuple[bytes, str]]:
    h = bytes.fromhex(json.loads(http(node, "/schema")[1])["schema_hash"])
    row = [0, harness.OP_UPSERT, harness.now_hlc(), [book_id], [book_id, "forged", "mallory", 2024]]
    origin = 9500 + book_id % 100
    return harness.build_messages(origin, 1, 1, harness.encode_changeset(origin, 1, 1, h, BOOKS, [row]))


def try_publish(url: str, msgs: list[tuple[bytes, str]]) -> str:
    """Publishes on the change subject as a plain NATS client; returns what went wrong."""
    import nats

    async def main():
        errors = []

        async def on_error(e):
            errors.append(str(e))

        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, error_cb=on_error)
        try:
            for data, mid in msgs:
                await nc.publish(harness.SUBJECT, data, headers={"Nats-Msg-Id": mid})
            await nc.flush(timeout=5)
            await asyncio.sleep(1)  # the server's -ERR for a denied publish is asynchronous
        finally:
            await nc.close()
        return "; ".join(errors)

    try:
        return asyncio.run(asyncio.wait_for(main(), 30))
    except Exception as e:  # refused at connect
        return f"{type(e).__name__}: {e}"


def not_applied(pair, book_id: int, settle: float = 3.0) -> None:
    # Give a forged changeset every chance to arrive: a legitimate write made
    # after it replicates first, then the forged row must still be absent.
    n1, n2 = pair.nodes
    marker = 700000 + book_id
    n2.execute("INSERT INTO books (id, title, author, publication_year) VALUES (?, 'marker', 'x', 1)", (marker,))
    harness.wait_equal(lambda: n1.scalar("SELECT count(*) FROM books WHERE id = ?", (marker,)), 1, REPL_TIMEOUT,
                       "a legitimate write replicates")
    time.sleep(settle)
    for n in pair.nodes:
        assert n.scalar("SELECT count(*) FROM books WHERE id = ?", (book_id,)) == 0, f"forged row on node {n.id}"


def logs(pair) -> str:
    return "".join(n.log_path.read_text(errors="replace") for n in pair.nodes)


def test_nodes_replicate_with_auth_on(pair):
    n1, n2 = pair.nodes
    n1.execute("INSERT INTO books (id, title, author, publication_year) VALUES (900001, 'ok', 'a', 2000)")
    harness.wait_equal(lambda: n2.scalar("SELECT title FROM books WHERE id = 900001"), "ok", REPL_TIMEOUT,
                       "replicated")


@pytest.mark.parametrize("who", ["anonymous", "wrong password"])
def test_unauthenticated_clients_are_refused(pair, who):
    n1 = pair.nodes[0]
    url = n1.nats_url if who == "anonymous" else url_with(n1, NODE_USER, "not-the-password")
    book_id = 101 if who == "anonymous" else 102
    err = try_publish(url, forged(n1, book_id))
    assert "uthorization" in err, f"{who}: connected and published ({err!r})"
    not_applied(pair, book_id)
    wait_until(lambda: "authentication error" in n1.log_path.read_text(errors="replace").lower()
               or "authorization violation" in n1.log_path.read_text(errors="replace").lower(),
               REPL_TIMEOUT, "the refusal in the node's log")


def test_reader_reads_but_cannot_publish(pair):
    n1 = pair.nodes[0]
    url = url_with(n1, READER_USER, READER_PASSWORD)

    async def read(nc, js):
        info = await js.stream_info(harness.STREAM)
        sub = await js.subscribe(harness.SUBJECT, ordered_consumer=True)
        msg = await sub.next_msg(timeout=10)
        await sub.unsubscribe()
        return info.state.messages, len(msg.data)

    import nats

    async def reader_main():
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            return await read(nc, nc.jetstream(timeout=10))
        finally:
            await nc.close()

    messages, size = asyncio.run(asyncio.wait_for(reader_main(), 60))
    assert messages >= 1 and size >= 48
    err = try_publish(url, forged(n1, 103))
    assert "ermissions" in err, f"the reader published ({err!r})"
    not_applied(pair, 103)
    wait_until(lambda: "publish violation" in n1.log_path.read_text(errors="replace").lower(), REPL_TIMEOUT,
               "the denied publish in the node's log")


def test_rogue_server_cannot_route_in(pair, tmp_path):
    n1 = pair.nodes[0]
    client, cluster = harness.free_port(), harness.free_port()
    seen = len(n1.log_path.read_bytes())
    log = open(tmp_path / "rogue.log", "wb")
    rogue = subprocess.Popen([harness.nats_server_bin(), "-a", "127.0.0.1", "-p", str(client), "--cluster_name",
                              "harmonylite", "--cluster", f"nats://127.0.0.1:{cluster}", "--routes",
                              f"nats://127.0.0.1:{n1.cluster_port}", "-D"], stdout=log, stderr=log,
                             start_new_session=True)
    try:
        wait_until(lambda: not harness._port_is_free(client), REPL_TIMEOUT, "the rogue server listening")
        wait_until(lambda: f"127.0.0.1:{n1.cluster_port}" in (tmp_path / "rogue.log").read_text(errors="replace"),
                   REPL_TIMEOUT, "the rogue server trying its route")
        time.sleep(2)  # time to join, were it let in
        err = try_publish(f"nats://127.0.0.1:{client}", forged(n1, 104))
        assert not err, err  # the rogue server takes it; it must go nowhere
        not_applied(pair, 104)
        wait_until(lambda: "uthoriz" in (tmp_path / "rogue.log").read_text(errors="replace")
                   or b"authentication error" in n1.log_path.read_bytes()[seen:].lower(),
                   REPL_TIMEOUT, "the rogue route refused in a log")
    finally:
        rogue.terminate()
        rogue.wait(15)
        log.close()


def test_no_secret_in_output_or_lax_files(pair, hl_bin):
    n1 = pair.nodes[0]
    out = subprocess.run([str(hl_bin), "-config", str(n1.config_path), "-check-config"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr + logs(pair) + http(n1, "/metrics")[1] + http(n1, "/schema")[1]
    for s in SECRETS:
        assert s not in text and quote(s, safe="") not in text
    conf = n1.data_dir / "nats" / "nats-server.conf"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600


K = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"


def sign(d, out) -> None:
    """A certificate for 127.0.0.1 signed by d's CA, good for both ends of a route, into out."""
    script = f"""
set -e
openssl req {K} -subj /CN=hl-route -keyout {out}/tls.key -out {out}/tls.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth,clientAuth\\n' > {out}/ext
openssl x509 -req -in {out}/tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile {out}/ext \\
    -out {out}/tls.crt 2>/dev/null
"""
    subprocess.run(["sh", "-c", script], cwd=d, check=True)


def make_certs(d) -> dict:
    """A CA and one certificate signed by it."""
    subprocess.run(["sh", "-c", f"openssl req -x509 {K} -days 2 -subj /CN=hl-route-ca -keyout ca.key -out ca.crt "
                                "2>/dev/null"], cwd=d, check=True)
    sign(d, d)
    return {"server_cert_file": str(d / "tls.crt"), "server_key_file": str(d / "tls.key"),
            "server_ca_file": str(d / "ca.crt")}


def test_route_tls_verifies_peers_and_reloads_renewed_files(hl_bin, tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    files = make_certs(certs)
    settings = {"replication_log": {"replicas": 2},
                "nats": {"user_name": NODE_USER, "user_password": NODE_PASSWORD, **files}}
    with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("tls"), size=2, settings=settings) as c:
        n1, n2 = c.nodes
        n1.execute("INSERT INTO books (id, title, author, publication_year) VALUES (900101, 'tls', 'a', 2000)")
        harness.wait_equal(lambda: n2.scalar("SELECT title FROM books WHERE id = 900101"), "tls", REPL_TIMEOUT,
                           "replicated over TLS routes")
        conf = (n1.data_dir / "nats" / "nats-server.conf").read_text()
        assert "verify: true" in conf and str(certs / "ca.crt") in conf

        # A rogue server without a certificate the CA signed cannot route in.
        client, cluster = harness.free_port(), harness.free_port()
        seen = len(n1.log_path.read_bytes())
        rogue_log = certs / "rogue.log"
        with open(rogue_log, "wb") as log:
            rogue = subprocess.Popen([harness.nats_server_bin(), "-a", "127.0.0.1", "-p", str(client),
                                      "--cluster_name", "harmonylite", "--cluster", f"nats://127.0.0.1:{cluster}",
                                      "--routes", f"nats://127.0.0.1:{n1.cluster_port}", "-D"],
                                     stdout=log, stderr=log, start_new_session=True)
        try:
            wait_until(lambda: not harness._port_is_free(client), REPL_TIMEOUT, "the rogue server listening")
            wait_until(lambda: f"127.0.0.1:{n1.cluster_port}" in rogue_log.read_text(errors="replace"),
                       REPL_TIMEOUT, "the rogue server trying its route")
            time.sleep(2)
            assert not try_publish(f"nats://127.0.0.1:{client}", forged(n1, 105))
            not_applied(c, 105)
            wait_until(lambda: b"tls" in n1.log_path.read_bytes()[seen:].lower()
                       or "tls" in rogue_log.read_text(errors="replace").lower(),
                       REPL_TIMEOUT, "the refused handshake in a log")
        finally:
            rogue.terminate()
            rogue.wait(15)

        # A renewal (new files swapped in) is loaded without a restart.
        seen = len(n1.log_path.read_bytes())
        renewed = tmp_path_factory.mktemp("renewed")
        sign(certs, renewed)
        for name in ("tls.crt", "tls.key"):
            os.replace(renewed / name, certs / name)
        wait_until(lambda: b"TLS files changed" in n1.log_path.read_bytes()[seen:], REPL_TIMEOUT,
                   "the renewal noticed")
        n2.execute("INSERT INTO books (id, title, author, publication_year) VALUES (900102, 'renewed', 'a', 2000)")
        harness.wait_equal(lambda: n1.scalar("SELECT title FROM books WHERE id = 900102"), "renewed", REPL_TIMEOUT,
                           "replicated after the renewal")
        assert n1.log_path.read_bytes()[seen:].count(b"nats-server started") == 0


def tls_connect(url: str, ca: str | None, cert: tuple[str, str] | None) -> str:
    """Connects over TLS (or plain when ca is None) and round-trips a PING; returns what went wrong, "" if nothing."""
    import ssl

    import nats

    async def main():
        ctx = None
        if ca is not None:
            ctx = ssl.create_default_context(cafile=ca)
            if cert:
                ctx.load_cert_chain(*cert)
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0, tls=ctx)
        try:
            await nc.flush(timeout=5)
        finally:
            await nc.close()
        return ""

    try:
        return asyncio.run(asyncio.wait_for(main(), 30))
    except Exception as e:
        return f"{type(e).__name__}: {e}" or "failed"


def test_client_port_tls_with_client_certificates(hl_bin, tmp_path_factory):
    """nats.client_tls: verify: the client port takes only TLS clients that present a certificate the
    CA signed; harmonylite's own connection does, and the nodes replicate."""
    certs = tmp_path_factory.mktemp("ccerts")
    files = make_certs(certs)
    settings = {"replication_log": {"replicas": 2},
                "nats": {"user_name": NODE_USER, "user_password": NODE_PASSWORD, "client_tls": "verify", **files}}
    with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("ctls"), size=2, settings=settings) as c:
        n1, n2 = c.nodes
        n1.execute("INSERT INTO books (id, title, author, publication_year) VALUES (900201, 'ctls', 'a', 2000)")
        harness.wait_equal(lambda: n2.scalar("SELECT title FROM books WHERE id = 900201"), "ctls", REPL_TIMEOUT,
                           "replicated with TLS on the client ports")
        conf = (n1.data_dir / "nats" / "nats-server.conf").read_text()
        top = conf[:conf.index("cluster {")]
        assert "tls {" in top and "verify: true" in top, conf

        url = url_with(n1, NODE_USER, NODE_PASSWORD)
        ca, pair_files = str(certs / "ca.crt"), (str(certs / "tls.crt"), str(certs / "tls.key"))
        # The right login is not enough: plain text, or TLS without a certificate, is refused.
        assert tls_connect(url, None, None), "a plain-text client connected"
        assert tls_connect(url, ca, None), "a TLS client without a certificate connected"
        err = try_publish(url, forged(n1, 106))
        assert err, "a plain-text client published"
        not_applied(c, 106)
        # A client with a certificate the CA signed and the login gets in.
        assert tls_connect(url.replace("nats://", "tls://"), ca, pair_files) == ""
        # The generated file holds the login: readable by its owner only.
        mode = stat.S_IMODE((n1.data_dir / "nats" / "nats-server.conf").stat().st_mode)
        assert mode == 0o600, oct(mode)


def test_leaf_connection_over_tls_with_a_client_certificate(hl_bin, tmp_path_factory):
    """nats.leaf_servers with the client's TLS files (nats.ca_file, cert_file, key_file): the embedded
    server connects to a hub that requires a client certificate; harmonylite's own connection to its
    embedded server stays plain (its client port has no TLS). Files renewed under a new CA are loaded
    without a restart: the hub, restarted to trust only the new CA, takes the leaf back."""
    certs, hub_dir = tmp_path_factory.mktemp("lcerts"), tmp_path_factory.mktemp("hub")
    make_certs(certs)
    client, leaf, monitor = harness.free_port(), harness.free_port(), harness.free_port()

    def start_hub(ca_dir):
        for name in ("ca.crt", "tls.crt", "tls.key"):
            shutil.copy(ca_dir / name, hub_dir / name)
        (hub_dir / "hub.conf").write_text(f"""
listen: 127.0.0.1:{client}
http: 127.0.0.1:{monitor}
leafnodes {{
  listen: 127.0.0.1:{leaf}
  tls {{ cert_file: "{hub_dir}/tls.crt", key_file: "{hub_dir}/tls.key", ca_file: "{hub_dir}/ca.crt", verify: true }}
}}
""")
        log = open(hub_dir / "hub.log", "ab")
        p = subprocess.Popen([harness.nats_server_bin(), "-c", str(hub_dir / "hub.conf")], stdout=log, stderr=log,
                             start_new_session=True)
        log.close()
        wait_until(lambda: leafs() >= 0, REPL_TIMEOUT, "the hub listening")
        return p

    def leafs() -> int:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/leafz", timeout=5) as r:
                return len(json.loads(r.read()).get("leafs") or [])
        except OSError:
            return -1

    settings = {"replication_log": {"replicas": 1},
                "nats": {"cluster_addr": "", "cluster_peers": [], "leaf_servers": [f"tls://127.0.0.1:{leaf}"],
                         "ca_file": str(certs / "ca.crt"), "cert_file": str(certs / "tls.crt"),
                         "key_file": str(certs / "tls.key"), "reconnect_wait_seconds": 1}}
    hub = start_hub(certs)
    try:
        with harness.started_cluster(hl_bin, tmp_path_factory.mktemp("leaf"), size=1, settings=settings) as c:
            n1 = c.nodes[0]
            wait_until(lambda: leafs() == 1, REPL_TIMEOUT, "the node's leaf connection on the hub")
            conf = (n1.data_dir / "nats" / "nats-server.conf").read_text()
            assert "leafnodes" in conf and str(certs / "tls.crt") in conf, conf
            # Renewed under a new CA: the node's files change in place, then the
            # hub restarts trusting only the new CA.
            seen = len(n1.log_path.read_bytes())
            new_ca = tmp_path_factory.mktemp("lnewca")
            make_certs(new_ca)
            for name in ("ca.crt", "tls.crt", "tls.key"):
                shutil.copy(new_ca / name, certs / (name + ".new"))
                os.replace(certs / (name + ".new"), certs / name)
            wait_until(lambda: b"TLS files changed" in n1.log_path.read_bytes()[seen:], REPL_TIMEOUT,
                       "the renewal noticed")
            hub.terminate()
            hub.wait(15)
            hub = start_hub(new_ca)
            wait_until(lambda: leafs() == 1, REPL_TIMEOUT, "the leaf connection with the renewed files")
            assert n1.log_path.read_bytes()[seen:].count(b"nats-server started") == 0
    finally:
        hub.terminate()
        hub.wait(15)
