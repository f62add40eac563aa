#!/usr/bin/env bash
# e2e-kind/run.sh - the StatefulSet scenarios (e2e-kind/scenarios.txt) on a real
# Kubernetes cluster made with kind.
#
#   HARMONYLITE_IMAGE=<image> e2e-kind/run.sh
#
# Where `docker info` fails (no Docker engine, as on our build machines) it says
# why and exits 0: the same scenarios run without Kubernetes in
# tests/deploy/test_rehearsal.py (pods as network namespaces, `scripts/test.sh`).
# Needs kind, kubectl and helm on PATH, an image of harmonylite
# (HARMONYLITE_IMAGE; loaded into the kind cluster) and an S3 bucket the pods
# can reach (S3_ENDPOINT, S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
# It has not run on our machines (no Docker): treat it as a starting point.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
    echo "e2e-kind: skipped: no Docker engine here (docker info failed); the same scenarios run"
    echo "e2e-kind: without Kubernetes in tests/deploy/test_rehearsal.py (scripts/test.sh, phase deploy)"
    exit 0
fi
for tool in kind kubectl helm; do
    command -v "$tool" >/dev/null || { echo "e2e-kind: $tool is not on PATH" >&2; exit 1; }
done
image=${HARMONYLITE_IMAGE:?set HARMONYLITE_IMAGE to an image of harmonylite (the repository has no Dockerfile yet: docs/kubernetes.md)}
cluster=${KIND_CLUSTER:-harmonylite-e2e}
ns=harmonylite-e2e

kind create cluster --name "$cluster" --wait 180s
trap 'kind delete cluster --name "$cluster"' EXIT
kind load docker-image --name "$cluster" "$image"
kubectl create namespace "$ns"

release() { # release REPLICAS
    helm upgrade --install harmonylite deploy/helm/harmonylite -n "$ns" --wait --timeout 10m \
        --set image.repository="${image%:*}" --set image.tag="${image##*:}" \
        --set replicaCount="$1" --set snapshot.s3.endpoint="${S3_ENDPOINT:?}" \
        --set snapshot.s3.bucket="${S3_BUCKET:?}" --set snapshot.s3.pathStyle=true \
        --set snapshot.s3.accessKeyId="${AWS_ACCESS_KEY_ID:?}" \
        --set snapshot.s3.secretAccessKey="${AWS_SECRET_ACCESS_KEY:?}"
}
ready_all() { kubectl -n "$ns" wait pod -l app.kubernetes.io/instance=harmonylite --for=condition=Ready --timeout=600s; }

while IFS=: read -r id what; do
    case $id in '#'* | '') continue ;; esac
    echo "== $id:$what"
    case $id in
    parallel-start) release 3 && ready_all ;;
    scale-up) kubectl -n "$ns" exec harmonylite-0 -c harmonylite -- harmonylite \
        -config /etc/harmonylite/harmonylite.yaml -save-snapshot && release 4 && ready_all ;;
    lose-volume) kubectl -n "$ns" delete pod harmonylite-1 --wait && ready_all ;;
    rolling-schema) echo "e2e-kind: $id needs an application image with a migration (app.image.*); not run" ;;
    scale-down) release 3 && ready_all ;;
    *) echo "e2e-kind: unknown scenario $id" >&2; exit 1 ;;
    esac
done <e2e-kind/scenarios.txt
echo "e2e-kind: every scenario ran"
