#!/usr/bin/env bash
# demo.sh - THE demo command: installs dependencies, builds the release binary
# and runs a local three-node cluster (examples/run-cluster.sh; its arguments,
# e.g. --non-interactive, are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh release --target harmonylite  # the demo needs only the binary
exec bash examples/run-cluster.sh "$@"
