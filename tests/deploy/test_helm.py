"""The Helm chart (deploy/helm/harmonylite) and the kustomize overlays: lint,
render for several value sets, validate every object against the Kubernetes
API schemas offline, and check what the chart promises (probes, ports,
volumes, security context, PDB arithmetic, discovery names, a configuration
harmonylite accepts)."""
import base64
import os
import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/harmonylite"
KUSTOMIZE = ROOT / "deploy/kustomize"
K8S_VERSION = "1.33.0"
KUBE_FLAG = ["--kube-version", K8S_VERSION]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}


def render(helm: str, *values: dict, sets: tuple = ()) -> list[dict]:
    args = [helm, "template", "hl", str(CHART), "--namespace", "apps", *KUBE_FLAG]
    files = []
    try:
        for v in values:
            f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
            yaml.safe_dump(v, f)
            f.close()
            files.append(f.name)
            args += ["-f", f.name]
        for s in sets:
            args += ["--set", s]
        out = subprocess.run(args, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    finally:
        for f in files:
            os.unlink(f)


def validate(docs: list[dict]) -> None:
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRDS:
            assert d["spec"]["selector"]["matchLabels"], d
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{d['kind']} {d['metadata']['name']}: {e.message} at {list(e.path)}")


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(sts: dict, name: str, init: bool = False) -> dict:
    spec = sts["spec"]["template"]["spec"]
    found = [c for c in spec.get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap")["data"]["harmonylite.yaml"])


S3 = {"snapshot": {"s3": {"bucket": "snaps", "endpoint": "http://s3.example:8333", "pathStyle": True,
                          "accessKeyId": "AKID", "secretAccessKey": "sekrit"}}}
APP = {"app": {"image": {"repository": "ghcr.io/example/app", "tag": "1.2"},
               "ports": [{"name": "http", "containerPort": 8090}],
               "args": ["serve", "--db", "/var/lib/app/data.db"]}}


def test_lint_strict(helm):
    out = subprocess.run([helm, "lint", "--strict", str(CHART), *KUBE_FLAG], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_default_install_renders_valid_objects(helm):
    docs = render(helm)
    validate(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Secret", "Secret", "Service", "Service", "ServiceAccount",
                     "StatefulSet"]
    sts = one(docs, "StatefulSet")
    spec = sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    # No bucket: no snapshot section and no restore init container (nothing to
    # restore from), so a plain install starts.
    assert "initContainers" not in pod
    assert "snapshot" not in config(docs)
    # Only harmonylite runs when no application image is given.
    assert [c["name"] for c in pod["containers"]] == ["harmonylite"]


def test_sidecar_probes_ports_and_security(helm):
    docs = render(helm, S3, APP)
    validate(docs)
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    hl = container(sts, "harmonylite")
    ports = {p["name"]: p["containerPort"] for p in hl["ports"]}
    assert ports == {"metrics": 8080, "cluster": 6222}
    assert hl["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert hl["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert hl["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The startup probe leaves minutes for a first start.
    assert hl["startupProbe"]["periodSeconds"] * hl["startupProbe"]["failureThreshold"] >= 300
    assert hl["args"] == ["-config", "/etc/harmonylite/harmonylite.yaml"]
    # Lame duck, then a grace period that covers it and harmonylite's drain.
    assert hl["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    assert pod["terminationGracePeriodSeconds"] >= 5 + config(docs)["shutdown_grace"]
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["data"] == "/var/lib/app" and mounts["tmp"] == "/tmp", c["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in vols["data"] and vols["config"]["configMap"]["name"] == sts["metadata"]["name"]
    # The application shares the database directory; the client Service
    # exposes its port and /metrics.
    app = container(sts, "app")
    assert app["image"] == "ghcr.io/example/app:1.2"
    svc = one(docs, "Service", "hl-harmonylite")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8090, "metrics": 8080}
    assert "clusterIP" not in svc["spec"]


def test_restore_init_container_and_s3_secret(helm):
    docs = render(helm, S3)
    validate(docs)
    sts = one(docs, "StatefulSet")
    init = container(sts, "restore", init=True)
    assert init["args"] == ["-config", "/etc/harmonylite/harmonylite.yaml", "-restore"]
    secret = one(docs, "Secret", "hl-harmonylite-s3")
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "sekrit"}
    for c in (init, container(sts, "harmonylite")):
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
        assert env["AWS_ACCESS_KEY_ID"] == {"name": secret["metadata"]["name"], "key": "AWS_ACCESS_KEY_ID"}
        assert env["AWS_SECRET_ACCESS_KEY"]["key"] == "AWS_SECRET_ACCESS_KEY"
    # The restore reads the same configuration, so it gets the same secrets
    # (a login without its password would be a configuration error).
    assert {e["name"] for e in init["env"]} == {e["name"] for e in container(sts, "harmonylite")["env"]}
    snap = config(docs)["snapshot"]
    assert snap == {"store": "s3", "keep": 3, "s3_bucket": "snaps", "s3_endpoint": "http://s3.example:8333",
                    "s3_path_style": True, "s3_prefix": "harmonylite/", "s3_region": "us-east-1"}
    # Secrets stay out of the ConfigMap.
    assert "sekrit" not in one(docs, "ConfigMap")["data"]["harmonylite.yaml"]
    # An existing Secret is used, none is created.
    docs = render(helm, S3, {"snapshot": {"s3": {"existingSecret": "mine", "accessKeyId": ""}}})
    validate(docs)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["hl-harmonylite-nats",
                                                                            "hl-harmonylite-nats-tls"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(one(docs, "StatefulSet"), "harmonylite")["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["name"] == "mine"


def test_route_auth_on_by_default(helm):
    docs = render(helm)
    secret = one(docs, "Secret", "hl-harmonylite-nats")
    assert set(secret["data"]) == {"user-password", "cluster-password"}
    assert all(len(v) >= 32 for v in secret["data"].values())
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert config(docs)["nats"]["user_name"] == "harmonylite"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(one(docs, "StatefulSet"), "harmonylite")["env"]}
    assert env["HARMONYLITE_NATS_CLUSTER_PASSWORD"] == {"name": "hl-harmonylite-nats", "key": "cluster-password"}
    # Off: no secret, no login.
    docs = render(helm, {"nats": {"auth": {"enabled": False}, "tls": {"enabled": False}}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert "user_name" not in config(docs)["nats"]


def test_route_tls_on_by_default(helm, tmp_path):
    """Without a Secret named, the chart generates a CA and a certificate for the pods' names under the
    headless service (and 127.0.0.1), kept across upgrades, and the routes verify each other."""
    docs = render(helm)
    validate(docs)
    secret = one(docs, "Secret", "hl-harmonylite-nats-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_bytes(base64.b64decode(secret["data"][name]))
    # The certificate is the CA's, and names what routes and harmonylite connect to.
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    for san in ("DNS:*.hl-harmonylite-peers.apps.svc.cluster.local", "DNS:*.hl-harmonylite-peers",
                "IP Address:127.0.0.1"):
        assert san in text, text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
    sts = one(docs, "StatefulSet")
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["nats-tls"]["secret"]["secretName"] == "hl-harmonylite-nats-tls"
    nats = config(docs)["nats"]
    assert nats["server_ca_file"] == "/etc/harmonylite/tls/ca.crt"
    assert nats["server_cert_file"] == "/etc/harmonylite/tls/tls.crt"
    assert "client_tls" not in nats
    # The client port too, on request.
    assert config(render(helm, {"nats": {"tls": {"clientPort": True}}}))["nats"]["client_tls"] == "verify"
    # Off: no Secret, no volume, no TLS files.
    docs = render(helm, {"nats": {"tls": {"enabled": False}}})
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-tls")]
    assert "nats-tls" not in [v["name"] for v in one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]]
    assert "server_cert_file" not in config(docs)["nats"]


def test_discovery_names_match_the_headless_service(helm):
    docs = render(helm)
    headless = one(docs, "Service", "hl-harmonylite-peers")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert "cluster" in [p["name"] for p in headless["spec"]["ports"]]
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["serviceName"] == "hl-harmonylite-peers"
    nats = config(docs)["nats"]
    # SRV name: _<port name>._tcp.<service>; the pod's search path adds the namespace.
    assert nats["cluster_peers"] == ["dns+srv://_cluster._tcp.hl-harmonylite-peers"]
    assert nats["cluster_addr"] == "0.0.0.0:6222"
    # The client port is for harmonylite itself only.
    assert nats["bind_address"].startswith("127.0.0.1:")


@pytest.mark.parametrize("replicas,max_unavailable,stream_replicas", [(1, None, 1), (2, 0, 2), (3, 1, 3),
                                                                      (4, 1, 3), (5, 2, 3)])
def test_pdb_and_quorum_arithmetic(helm, replicas, max_unavailable, stream_replicas):
    docs = render(helm, {"replicaCount": replicas})
    validate(docs)
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    if max_unavailable is None:
        assert not pdbs
    else:
        assert pdbs[0]["spec"]["maxUnavailable"] == max_unavailable
        # What stays up is a majority.
        assert replicas - max_unavailable > replicas // 2
    cfg = config(docs)
    assert cfg["replication_log"]["replicas"] == stream_replicas
    assert cfg["nats"]["cluster_min_peers"] == replicas - 1


def test_optional_objects(helm):
    docs = render(helm, S3, APP, {
        "database": {"volume": "persistentVolumeClaim", "persistence": {"size": "5Gi", "storageClassName": "fast"}},
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True, "ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]},
        "nats": {"auth": {"existingSecret": "nats-creds"}, "tls": {"secretName": "peers-tls"}},
        "harmonylite": {"config": {"replication_log": {"max_age": 86400}}},
        "topologySpreadConstraints": [],
    })
    validate(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert "ServiceMonitor" in kinds and "PodMonitor" in kinds and "NetworkPolicy" in kinds
    sts = one(docs, "StatefulSet")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert "data" not in [v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]]
    assert "topologySpreadConstraints" not in sts["spec"]["template"]["spec"]
    env = {e["name"]: e.get("valueFrom") for e in container(sts, "harmonylite")["env"]}
    assert env["HARMONYLITE_NATS_USER_PASSWORD"]["secretKeyRef"] == {"name": "nats-creds", "key": "user-password"}
    assert env["HARMONYLITE_NATS_CLUSTER_PASSWORD"]["secretKeyRef"] == {"name": "nats-creds",
                                                                        "key": "cluster-password"}
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-nats")]
    # Route TLS from the Secret, mounted as a directory so renewals show.
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["nats-tls"]["secret"]["secretName"] == "peers-tls"
    mounts = {m["name"]: m for m in container(sts, "harmonylite")["volumeMounts"]}
    assert mounts["nats-tls"]["mountPath"] == "/etc/harmonylite/tls" and "subPath" not in mounts["nats-tls"]
    cfg = config(docs)
    assert cfg["replication_log"] == {"replicas": 3, "max_age": 86400}
    assert cfg["nats"]["server_ca_file"] == "/etc/harmonylite/tls/ca.crt"
    netpol = one(docs, "NetworkPolicy")
    ports = [p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]]
    assert 6222 in ports and 8090 in ports


@pytest.mark.parametrize("bad,message", [
    ({"replicaCount": 0}, "replicaCount"),
    ({"snapshot": {"store": "ftp"}}, "store"),
    ({"harmonylit": {}}, "harmonylit"),
    ({"database": {"path": "relative.db"}}, "path"),
])
def test_schema_refuses_bad_values(helm, bad, message):
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump(bad, f)
    f.close()
    try:
        out = subprocess.run([helm, "template", "hl", str(CHART), "-f", f.name, *KUBE_FLAG],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    assert out.returncode != 0
    assert message in out.stderr


@pytest.mark.parametrize("values", [{}, S3, {"replicaCount": 1, "snapshot": {"store": "dir", "dir": "/snapshots"}}])
def test_harmonylite_accepts_the_rendered_configuration(helm, values, tmp_path):
    binary = os.environ.get("HARMONYLITE_BIN", str(ROOT / "build/harmonylite"))
    if not os.path.exists(binary):
        pytest.skip(f"no harmonylite binary at {binary} (set HARMONYLITE_BIN)")
    path = tmp_path / "harmonylite.yaml"
    path.write_text(one(render(helm, values), "ConfigMap")["data"]["harmonylite.yaml"])
    cmd = [binary, "-config", str(path), "-check-config"]
    # What the pod gets from the chart's Secrets.
    env = {**os.environ, "HARMONYLITE_NATS_USER_PASSWORD": "u" * 32, "HARMONYLITE_NATS_CLUSTER_PASSWORD": "c" * 32}
    if os.geteuid() == 0:
        # As the pod runs it: the node id from the StatefulSet host name.
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname hl-harmonylite-2 && exec "$@"', "sh", *cmd]
    else:
        cmd.append("-node-id=3")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "u" * 32 not in out.stdout and "c" * 32 not in out.stdout
    if os.geteuid() == 0:
        assert "node_id: 3" in out.stdout, out.stdout


def kustomize_build(kustomize: str, overlay: str) -> list[dict]:
    out = subprocess.run([kustomize, "build", str(KUSTOMIZE / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomize_base_is_the_chart(helm):
    out = subprocess.run(["bash", str(ROOT / "scripts/render-kustomize.sh"), "--check"], capture_output=True,
                         text=True, env={**os.environ, "HL_HELM": helm})
    assert out.returncode == 0, out.stderr


def test_kustomize_production(kustomize):
    docs = kustomize_build(kustomize, "production")
    validate(docs)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"harmonylite"}
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "data" not in [v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]]
    assert container(sts, "harmonylite")["resources"]["limits"]["memory"] == "1Gi"
    cfg = config(docs)
    assert cfg["replication_log"]["replicas"] == 3
    assert cfg["snapshot"]["store"] == "s3"
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert container(sts, "restore", init=True)


def test_kustomize_dev(kustomize):
    docs = kustomize_build(kustomize, "dev")
    validate(docs)
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    cfg = config(docs)
    assert cfg["snapshot"] == {"store": "dir", "dir": "/snapshots", "keep": 3}
    assert cfg["replication_log"]["replicas"] == 1
    assert cfg["nats"]["cluster_min_peers"] == 0
    for c in (container(sts, "harmonylite"), container(sts, "restore", init=True)):
        assert "env" not in c  # no S3 credentials
        assert {"name": "snapshots", "mountPath": "/snapshots"} in c["volumeMounts"]
    one(docs, "PersistentVolumeClaim", "harmonylite-snapshots")


def test_scenario_list_is_shared_with_e2e_kind():
    """e2e-kind/run.sh and the rehearsal (test_rehearsal.COVERED) run the same scenarios."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_rehearsal import COVERED

    listed = [line.split(":", 1)[0] for line in (ROOT / "e2e-kind/scenarios.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == COVERED
