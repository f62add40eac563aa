"""The StatefulSet rehearsal: the chart's scenarios without Kubernetes.

Each "pod" is a network namespace on a bridge, with its own address and host
name (harmonylite-0, ...), a private mount namespace where the pod's volume is
at the chart's database directory, the ConfigMap at /etc/harmonylite and a
resolv.conf pointing at a real DNS server (dnsmasq) that serves the headless
Service's SRV and A records the way Kubernetes does. Each pod runs exactly the
commands, arguments, environment (Secrets resolved) and configuration that
`helm template` renders for it: the restore init container, then the
harmonylite sidecar. The application is a writer on each pod's database file.
Snapshots go to a real S3 server (versitygw).

Scenarios, with the writers running throughout: a parallel start of 3 pods
forms one cluster; scale 3 -> 4 (records added, the new pod restores from S3
and converges); a pod killed and its volume wiped restores and converges; a
rolling schema change pod by pod, each waited for on /readyz; scale 4 -> 3.
Nothing is lost, and the dumps are identical at the end of each.

Needs root (namespaces, a bridge, port 53 on it); the deploy phase of
scripts/test.sh runs it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import harness  # noqa: E402
from harness import wait_until  # noqa: E402
from test_snapshot import S3Server, _s3_binary  # noqa: E402

CHART = ROOT / "deploy/helm/harmonylite"
NET = "10.77.0"
BRIDGE = "hlr-br0"
DOMAIN = "default.svc.cluster.local"
TIMEOUT = 120
SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, pod INTEGER NOT NULL, body TEXT)"

def _root_is_mount_point() -> bool:
    return subprocess.run(["mountpoint", "-q", "/"]).returncode == 0


# Each pod's private mount namespace needs / to be a mount point (to make its
# mounts private); inside a chroot, as a CI root is, it is not, and mounts
# made there would show outside.
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the rehearsal needs root for namespaces"),
              pytest.mark.skipif(not _root_is_mount_point(),
                                 reason="/ is not a mount point (this runs in a chroot, as a CI root does): pods' "
                                        "mount namespaces cannot be made private; on a machine or VM it runs")]


def listening(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sk:
        sk.settimeout(2)
        return sk.connect_ex((host, port)) == 0


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def render(helm: str, values: dict, tmp: Path) -> list[dict]:
    vf = tmp / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    out = sh(helm, "template", "harmonylite", str(CHART), "--namespace", "default", "-f", str(vf))
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def secret_value(docs: list[dict], name: str, key: str) -> str:
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"] == name:
            if key in d.get("stringData", {}):
                return d["stringData"][key]
            return base64.b64decode(d["data"][key]).decode()
    raise KeyError(f"secret {name}/{key} not rendered")


def container_env(docs: list[dict], c: dict) -> dict:
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret_value(docs, ref["name"], ref["key"])
    return env


class Pod:
    """One pod: namespace, volume, processes. `spec` is the rendered pod template."""

    def __init__(self, cluster: "Rehearsal", ordinal: int):
        self.c = cluster
        self.ordinal = ordinal
        self.name = f"harmonylite-{ordinal}"
        self.ip = f"{NET}.{10 + ordinal}"
        self.ns = f"hlr-{ordinal}"
        self.dir = cluster.tmp / self.name
        self.volume = self.dir / "volume"
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "harmonylite.log"

    @property
    def db(self) -> Path:
        return self.volume / "data.db"

    def create_network(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", f"{self.ns}-h", "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "link", "set", f"{self.ns}-h", "master", BRIDGE, "up")
        sh(*self.enter(), "ip", "addr", "add", f"{self.ip}/24", "dev", "eth0")
        sh(*self.enter(), "ip", "link", "set", "eth0", "up")
        sh(*self.enter(), "ip", "link", "set", "lo", "up")

    def enter(self) -> list[str]:
        # nsenter rather than `ip netns exec`, which remounts /sys and cannot
        # inside a chroot (a CI root).
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def delete_network(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", f"{self.ns}-h", check=False)

    def argv(self, container: dict) -> list[str]:
        """The container's command in this pod's namespaces and mounts."""
        conf = self.c.config_dir
        setup = (f"hostname {self.name} && mount -t tmpfs tmpfs /var/lib && mkdir -p /var/lib/app && "
                 f"mount --bind {self.volume} /var/lib/app && mount --bind {conf} /etc/harmonylite && "
                 f"mount --bind {self.c.resolv} /etc/resolv.conf && "
                 f"mkdir -p {self.dir}/tmp && mount --bind {self.dir}/tmp /tmp && exec \"$@\"")
        # The image's entrypoint is harmonylite; the chart gives only args.
        return [*self.enter(), "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", setup, "sh", str(self.c.binary), *container["args"]]

    def env(self, container: dict) -> dict:
        return {"PATH": os.environ["PATH"], **container_env(self.c.docs, container)}

    def run_init(self) -> str:
        init = self.c.pod_spec["initContainers"][0]
        out = subprocess.run(self.argv(init), env=self.env(init), capture_output=True, text=True, timeout=300)
        with open(self.dir / "restore.log", "a") as f:
            f.write(out.stdout + out.stderr)
        assert out.returncode == 0, f"{self.name} restore failed:\n{out.stdout}{out.stderr}"
        return out.stdout + out.stderr

    def start(self) -> str:
        self.volume.mkdir(parents=True, exist_ok=True)
        restored = self.run_init()
        sidecar = [c for c in self.c.pod_spec["containers"] if c["name"] == "harmonylite"][0]
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(sidecar), env=self.env(sidecar), stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return restored

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.ip}:8080{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        assert self.proc is None or self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
        return self.http("/readyz")[0] == 200

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(60)
        self.proc = None

    def rows(self) -> list[tuple]:
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute("SELECT id, pod, body FROM notes ORDER BY id").fetchall()


class Writer(threading.Thread):
    """The application on one pod: a long-lived connection writing a row every few ms."""

    def __init__(self, pod: Pod):
        super().__init__(daemon=True)
        self.pod = pod
        self.written: list[int] = []
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.pod.db, timeout=30, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 30000")
            n = 0
            while not self.stop_flag.is_set():
                n += 1
                rid = (self.pod.ordinal + 1) * 10_000_000 + n
                conn.execute("INSERT INTO notes (id, pod, body) VALUES (?, ?, ?)", (rid, self.pod.ordinal, f"w{n}"))
                self.written.append(rid)
                time.sleep(0.02)
            conn.close()
        except BaseException as e:  # reported by the test
            self.error = e

    def finish(self) -> list[int]:
        self.stop_flag.set()
        self.join(30)
        assert self.error is None, f"writer on {self.pod.name}: {self.error!r}"
        return self.written


class Rehearsal:
    def __init__(self, helm: str, tmp: Path, s3: "S3"):
        self.tmp = tmp
        self.binary = Path(os.environ.get("HARMONYLITE_BIN", ROOT / "build/harmonylite")).resolve()
        values = {"replicaCount": 3,
                  "harmonylite": {"discoveryInterval": 2},
                  "snapshot": {"s3": {"endpoint": f"http://{NET}.1:{s3.port}", "bucket": "snapshots",
                                      "pathStyle": True, "prefix": "rehearsal/",
                                      "accessKeyId": S3Server.ACCESS, "secretAccessKey": S3Server.SECRET}}}
        self.docs = render(helm, values, tmp)
        sts = [d for d in self.docs if d["kind"] == "StatefulSet"][0]
        self.pod_spec = sts["spec"]["template"]["spec"]
        cm = [d for d in self.docs if d["kind"] == "ConfigMap"][0]
        self.config_dir = tmp / "etc-harmonylite"
        self.config_dir.mkdir()
        (self.config_dir / "harmonylite.yaml").write_text(cm["data"]["harmonylite.yaml"])
        self.mount_secrets()
        self.resolv = tmp / "resolv.conf"
        self.resolv.write_text(f"nameserver {NET}.1\nsearch {DOMAIN} svc.cluster.local cluster.local\n"
                               "options ndots:5\n")
        self.pods: dict[int, Pod] = {}
        self.dns: subprocess.Popen | None = None
        self.made_etc = not Path("/etc/harmonylite").exists()

    def mount_secrets(self) -> None:
        """Secret volumes the sidecar mounts under /etc/harmonylite (the route TLS files) become
        files in the directory bound there, as the kubelet would write them."""
        sidecar = [c for c in self.pod_spec["containers"] if c["name"] == "harmonylite"][0]
        mounts = {m["name"]: m["mountPath"] for m in sidecar.get("volumeMounts", [])}
        for v in self.pod_spec.get("volumes", []):
            if "secret" not in v or not mounts.get(v["name"], "").startswith("/etc/harmonylite/"):
                continue
            d = self.config_dir / mounts[v["name"]].removeprefix("/etc/harmonylite/")
            d.mkdir(parents=True)
            secret = [s for s in self.docs if s["kind"] == "Secret"
                      and s["metadata"]["name"] == v["secret"]["secretName"]][0]
            for key, value in secret["data"].items():
                (d / key).write_bytes(base64.b64decode(value))
                os.chmod(d / key, 0o600)

    def setup(self) -> None:
        if self.made_etc:
            os.mkdir("/etc/harmonylite")
        # Leftovers of a run that was killed: same names, same addresses.
        for ns in sh("ip", "netns", "list", check=False).stdout.split("\n"):
            if ns.startswith("hlr-"):
                sh("ip", "netns", "del", ns.split()[0], check=False)
        for link in sh("ip", "-o", "link", "show", check=False).stdout.split("\n"):
            name = link.split(":")[1].strip().split("@")[0] if link.count(":") >= 2 else ""
            if name.startswith("hlr-"):
                sh("ip", "link", "del", name, check=False)
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")

    def teardown(self) -> None:
        for p in self.pods.values():
            p.stop(signal.SIGKILL)
            p.delete_network()
        if self.dns and self.dns.poll() is None:
            self.dns.terminate()
            self.dns.wait(30)
        sh("ip", "link", "del", BRIDGE, check=False)
        if self.made_etc:
            shutil.rmtree("/etc/harmonylite", ignore_errors=True)

    def set_records(self) -> None:
        """The headless Service's records: one SRV target and A record per pod."""
        svc = f"harmonylite-peers.{DOMAIN}"
        lines = [f"listen-address={NET}.1", "bind-interfaces", "port=53", "no-resolv", "no-hosts", "no-negcache",
                 "local-ttl=0"]
        for p in self.pods.values():
            target = f"{p.name}.{svc}"
            lines += [f"srv-host=_cluster._tcp.{svc},{target},6222", f"host-record={target},{p.ip}"]
        conf = self.tmp / "dnsmasq.conf"
        conf.write_text("\n".join(lines) + "\n")
        if self.dns and self.dns.poll() is None:
            self.dns.terminate()
            self.dns.wait(30)
        log = open(self.tmp / "dnsmasq.log", "ab")
        self.dns = subprocess.Popen(["dnsmasq", "-k", "--user=root", "--pid-file=", f"--conf-file={conf}",
                                     "--log-facility=-"], stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_until(lambda: listening(f"{NET}.1", 53), 30, "dnsmasq listening")

    def add_pod(self, ordinal: int) -> Pod:
        p = Pod(self, ordinal)
        p.dir.mkdir(parents=True, exist_ok=True)
        self.pods[ordinal] = p  # before its network: teardown removes what was made
        p.create_network()
        return p

    def remove_pod(self, ordinal: int) -> None:
        p = self.pods.pop(ordinal)
        p.stop()
        p.delete_network()

    def converged(self, pods: list[Pod]) -> bool:
        first = pods[0].rows()
        return all(p.rows() == first for p in pods[1:])

    def wait_converged(self, pods: list[Pod], what: str) -> list[tuple]:
        try:
            wait_until(lambda: self.converged(pods), TIMEOUT, f"identical dumps {what}")
        except harness.WaitTimeout:
            sets = {p.name: {r[0] for r in p.rows()} for p in pods}
            union = set().union(*sets.values())
            detail = "; ".join(f"{n}: {len(v)} rows, missing {sorted(union - v)[:5]}" for n, v in sets.items())
            raise AssertionError(f"not converged {what}: {detail}\n" +
                                 "\n".join(f"--- {p.name}\n{p.tail()}" for p in pods)) from None
        return pods[0].rows()


class S3:
    """versitygw (scripts/install-s3-server.sh) on the bridge address, bucket "snapshots"."""

    def __init__(self, root: Path):
        binary, why = _s3_binary()
        assert binary is not None, why
        self.binary = binary
        self.root = root / "s3root"
        (self.root / "snapshots").mkdir(parents=True)
        self.port = harness.free_port()
        self.proc: subprocess.Popen | None = None
        self.logpath = root / "versitygw.log"

    def start(self) -> None:
        with open(self.logpath, "ab") as log:
            self.proc = subprocess.Popen([str(self.binary), "--access", S3Server.ACCESS, "--secret", S3Server.SECRET,
                                          "--port", f"{NET}.1:{self.port}", "--quiet", "posix", str(self.root)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: listening(f"{NET}.1", self.port), 60, "the S3 server on the bridge")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


@pytest.fixture()
def rehearsal(helm, tmp_path):
    if not Path(os.environ.get("HARMONYLITE_BIN", ROOT / "build/harmonylite")).exists():
        pytest.fail("no harmonylite binary (set HARMONYLITE_BIN)")
    s3 = S3(tmp_path)
    r = Rehearsal(helm, tmp_path, s3)
    r.setup()
    try:
        s3.start()
        yield r
    finally:
        r.teardown()
        s3.stop()


COVERED = ["parallel-start", "scale-up", "lose-volume", "rolling-schema", "scale-down"]


def test_statefulset_scenarios(rehearsal):
    r = rehearsal
    pods = [r.add_pod(i) for i in range(3)]
    r.set_records()

    # parallel-start: every pod waits for its peers' records, one cluster forms.
    for p in pods:
        assert "nothing restored" in p.start()  # a brand-new cluster: no snapshot, start empty
    for p in pods:
        wait_until(p.ready, TIMEOUT, f"{p.name} ready")
    for p in pods:
        with sqlite3.connect(p.db, timeout=30) as conn:
            conn.execute(SCHEMA)
    writers = {p.ordinal: Writer(p) for p in pods}
    for w in writers.values():
        w.start()
    time.sleep(2)
    r.wait_converged(pods, "after a parallel start")
    assert {row[1] for row in pods[0].rows()} == {0, 1, 2}, "writes from every pod on pod 0"

    # A snapshot, taken with the sidecar's own command and environment.
    sidecar = [c for c in r.pod_spec["containers"] if c["name"] == "harmonylite"][0]
    save = subprocess.run(pods[0].argv({"args": sidecar["args"] + ["-save-snapshot"]}), env=pods[0].env(sidecar),
                          capture_output=True, text=True, timeout=300)
    assert save.returncode == 0, save.stdout + save.stderr

    # scale-up: the new pod's records appear, it restores from S3 and joins.
    p3 = r.add_pod(3)
    r.set_records()
    assert "restored" in p3.start() and "nothing restored" not in (p3.dir / "restore.log").read_text()
    wait_until(p3.ready, TIMEOUT, "harmonylite-3 ready")
    writers[3] = Writer(p3)
    writers[3].start()
    pods = [r.pods[i] for i in range(4)]
    time.sleep(2)
    r.wait_converged(pods, "after scaling to 4")

    # lose-volume: a pod killed with its volume wiped restores and converges.
    p1 = r.pods[1]
    written_by_1 = writers.pop(1).finish()
    p1.stop(signal.SIGKILL)
    shutil.rmtree(p1.volume)
    assert "restored" in p1.start()
    wait_until(p1.ready, TIMEOUT, "harmonylite-1 ready again")
    rows = r.wait_converged(pods, "after a pod lost its volume")
    ids = {row[0] for row in rows}
    # What pod 1 wrote before it died either replicated before the kill or is
    # lost with its volume (an emptyDir); what was replicated stays everywhere.
    assert ids >= {i for i in written_by_1 if any(i in {x[0] for x in q.rows()} for q in pods if q is not p1)}

    # rolling-schema: pod by pod, each waited for on /readyz.
    for p in pods:
        with sqlite3.connect(p.db, timeout=30) as conn:
            conn.execute("ALTER TABLE notes ADD COLUMN tag TEXT")
        wait_until(p.ready, TIMEOUT, f"{p.name} ready after its migration")
    with sqlite3.connect(pods[2].db, timeout=30) as conn:
        conn.execute("INSERT INTO notes (id, pod, body, tag) VALUES (1, 2, 'after', 'v2')")
    wait_until(lambda: all(q.rows() and q.rows()[0][:2] == (1, 2) for q in pods), TIMEOUT, "the new column's row")

    # scale-down: the last pod goes, its records with it.
    written = {o: w.finish() for o, w in writers.items()}
    r.remove_pod(3)
    r.set_records()
    pods = [r.pods[i] for i in range(3)]
    rows = r.wait_converged(pods, "after scaling back to 3")
    ids = {row[0] for row in rows}
    for o, w in written.items():
        missing = [i for i in w if i not in ids]
        assert not missing, f"{len(missing)} rows written on harmonylite-{o} lost, e.g. {missing[:5]}"
    for p in pods:
        assert p.ready()
        assert "panic" not in p.tail().lower()
