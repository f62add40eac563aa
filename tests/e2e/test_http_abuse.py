"""The HTTP listener under abuse (docs/security.md, "HTTP"), on single nodes of their own.

- 500 slow connections trickling header bytes from 50 client addresses: a fresh client still
  gets /healthz and /readyz answered while they stay open.
- One address cannot hold more than http.max_connections_per_client connections.
- A connection trickling a byte now and then is closed at its deadline (http.request_timeout):
  the bytes do not extend it.
- With http.auth_token_file, /metrics and /schema want the bearer token, the probes never do.
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import harness
from harness import wait_until

SLOW_CLIENTS = 50  # addresses 127.0.0.10 .. 127.0.0.59
SLOW_PER_CLIENT = 10  # under the default per-client limit (16)
TOKEN = "e2e-token-0123456789abcdef"


def _node(hl_bin, root, http_settings: dict) -> harness.Node:
    """A single node with the embedded server, not clustered."""
    settings = {"replication_log": {"replicas": 1}, "nats": {"cluster_addr": "", "cluster_peers": []}}
    if http_settings:
        settings["http"] = http_settings
    node = harness.Node(hl_bin, root, 1, harness.free_port(), harness.free_port(), harness.free_port(), [],
                        settings=settings)
    node.executescript(harness.BOOKS_SCHEMA)
    return node


@pytest.fixture(scope="module")
def guarded(hl_bin, tmp_path_factory):
    """A node whose deadline (60 s) outlasts every wait below, with a bearer token."""
    root = tmp_path_factory.mktemp("http_abuse")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    node = _node(hl_bin, root / "node", {"request_timeout": 60, "auth_token_file": str(token_file)})
    try:
        node.start()
        wait_until(lambda: get(node, "/healthz")[0] == 200, harness.REPL_TIMEOUT, "healthz")
        yield node
        node.stop()
    finally:
        node.kill()


def get(node, path: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, str, dict]:
    """(status, body, headers) from a fresh connection out of 127.0.0.1."""
    req = urllib.request.Request(node.http_url + path)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def slow_connection(port: int, source: str) -> socket.socket:
    """A connection from source that has sent part of a request's headers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    s.setblocking(False)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """True once the server closed (or reset) the connection; never blocks."""
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Trickler:
    """Sends one more header byte on every connection about once a second."""

    def __init__(self, socks: list[socket.socket]):
        self.socks = socks
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for s in self.socks:
                try:
                    s.send(b"X")
                except OSError:
                    pass

    def __enter__(self) -> "Trickler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def _room_for(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def test_probes_answer_while_500_slow_connections_are_open(guarded):
    _room_for(SLOW_CLIENTS * SLOW_PER_CLIENT)
    socks = [slow_connection(guarded.http_port, f"127.0.0.{10 + c}")
             for c in range(SLOW_CLIENTS) for _ in range(SLOW_PER_CLIENT)]
    with Trickler(socks):
        # The server has taken them all (none closed), then a fresh client is answered.
        time.sleep(1.0)
        assert not [s for s in socks if closed_by_server(s)]
        code, body, _ = get(guarded, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok", body
        code, body, _ = get(guarded, "/readyz")
        assert code in (200, 503) and "ready" in json.loads(body), body
        # ... while every slow connection is still open.
        still_open = [s for s in socks if not closed_by_server(s)]
        assert len(still_open) == len(socks), f"{len(socks) - len(still_open)} slow connections were closed"
    # and once they are gone, all is as before
    assert get(guarded, "/healthz")[0] == 200


def test_one_client_address_gets_a_bounded_number_of_connections(guarded):
    limit = 16  # http.max_connections_per_client's default
    socks = []
    for _ in range(limit + 24):
        try:
            socks.append(slow_connection(guarded.http_port, "127.0.0.77"))
        except OSError:
            pass  # closed by the server before our first bytes went out: refused, as wanted
    with Trickler(socks):
        wait_until(lambda: sum(closed_by_server(s) for s in socks) >= len(socks) - limit, harness.REPL_TIMEOUT,
                   f"connections over {limit} from one address closed")
        assert sum(not closed_by_server(s) for s in socks) == limit
        # another address is not affected
        assert get(guarded, "/healthz")[0] == 200


def test_token_guards_metrics_and_schema_but_never_the_probes(guarded):
    for path in ("/metrics", "/schema"):
        code, _, headers = get(guarded, path)
        assert code == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer"), (path, code)
        assert get(guarded, path, token="wrong")[0] == 401
        assert get(guarded, path, token=TOKEN)[0] == 200
    assert get(guarded, "/healthz")[0] == 200
    assert get(guarded, "/readyz")[0] in (200, 503)
    assert TOKEN not in guarded.log_since_start()


def test_trickled_bytes_do_not_extend_the_deadline(tmp_path, hl_bin):
    """Default http.request_timeout (10 s): a client sending a byte every half second is cut
    off all the same (libmicrohttpd's idle timeout alone never would)."""
    node = _node(hl_bin, tmp_path / "node", {})
    try:
        node.start()
        wait_until(lambda: get(node, "/healthz")[0] == 200, harness.REPL_TIMEOUT, "healthz")
        s = slow_connection(node.http_port, "127.0.0.90")
        deadline = time.monotonic() + harness.SLOW_TIMEOUT
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                s.send(b"X")
            except OSError:
                closed = True
            closed = closed or closed_by_server(s)
            time.sleep(0.5)
        s.close()
        assert closed, f"a trickling connection stayed open for {harness.SLOW_TIMEOUT:.0f} s"
        assert get(node, "/healthz")[0] == 200
        node.stop()
    finally:
        node.kill()
