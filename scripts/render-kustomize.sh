#!/usr/bin/env bash
# render-kustomize.sh - writes the kustomize base (deploy/kustomize/base/) and
# the dev overlay's configuration from the Helm chart, so that the chart is the
# one place the manifests are written.
#
#   scripts/render-kustomize.sh           # rewrite the files
#   scripts/render-kustomize.sh --check   # exit 1 when a committed file differs
#
# helm comes from scripts/install-go-tools.sh (or $HL_HELM).
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
case "${1:-}" in
--check) check=1 ;;
"") ;;
*)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac

helm=${HL_HELM:-$(bash scripts/install-go-tools.sh helm)}
out=$(mktemp -d "${TMPDIR:-/tmp}/render-kustomize.XXXXXX")
trap 'rm -rf "$out"' EXIT

chart=deploy/helm/harmonylite
k=deploy/kustomize
mkdir -p "$out/base" "$out/dev"
# One file per object, named after its kind; the namespace is the overlay's.
"$helm" template harmonylite "$chart" -f "$k/values-base.yaml" >"$out/all.yaml"
python3 - "$out/all.yaml" "$out/base" <<'PY'
import os, re, sys
docs = [d for d in open(sys.argv[1]).read().split("\n---\n") if d.strip()]
names = []
for d in docs:
    d = re.sub(r"^---\n", "", d.strip("\n") + "\n")
    d = re.sub(r"^# Source: .*\n", "", d, flags=re.M)
    kind = re.search(r"^kind: (\S+)", d, re.M).group(1)
    obj = re.search(r"^metadata:\n  name: (\S+)", d, re.M).group(1)
    name = re.sub(r"(?<!^)(?=[A-Z])", "-", kind).lower() + "-" + obj + ".yaml"
    names.append(name)
    with open(os.path.join(sys.argv[2], name), "w") as f:
        f.write("# Rendered from deploy/helm/harmonylite by scripts/render-kustomize.sh; do not edit.\n" + d)
with open(os.path.join(sys.argv[2], "kustomization.yaml"), "w") as f:
    f.write("# Rendered by scripts/render-kustomize.sh from the Helm chart with\n"
            "# deploy/kustomize/values-base.yaml; do not edit, edit the chart or the values.\n"
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n")
    for n in sorted(names):
        f.write(f"  - {n}\n")
PY
"$helm" template harmonylite "$chart" -f "$k/values-dev.yaml" --show-only templates/configmap.yaml >"$out/dev.yaml"
python3 - "$out/dev.yaml" "$out/dev/harmonylite.yaml" <<'PY'
import sys, yaml
cm = yaml.safe_load(open(sys.argv[1]))
with open(sys.argv[2], "w") as f:
    f.write("# Rendered from deploy/helm/harmonylite with deploy/kustomize/values-dev.yaml\n"
            "# by scripts/render-kustomize.sh; do not edit.\n" + cm["data"]["harmonylite.yaml"])
PY

status=0
compare() { # compare NEW COMMITTED
    if [ "$check" = 1 ]; then
        if ! diff -u "$2" "$1" >&2; then
            echo "render-kustomize: $2 differs from the chart's rendering; run scripts/render-kustomize.sh" >&2
            status=1
        fi
    else
        cp "$1" "$2"
    fi
}
if [ "$check" = 1 ]; then
    for f in "$k"/base/*.yaml; do
        [ -e "$out/base/$(basename "$f")" ] || {
            echo "render-kustomize: $f is no longer rendered" >&2
            status=1
        }
    done
else
    rm -f "$k"/base/*.yaml
fi
for f in "$out"/base/*.yaml; do
    compare "$f" "$k/base/$(basename "$f")"
done
compare "$out/dev/harmonylite.yaml" "$k/overlays/dev/harmonylite.yaml"
exit $status
