#!/usr/bin/env bash
# build.sh - configures and builds harmonylite with CMake.
#
#   scripts/build.sh [release|asan] [cmake --build options, e.g. --target harmonylite]
#
# release (default): build/       -DCMAKE_BUILD_TYPE=Release -DHL_WERROR=ON
# asan:              build-asan/  -DCMAKE_BUILD_TYPE=Debug -DHL_SANITIZE=ON -DHL_WERROR=ON
#                                 (AddressSanitizer + UndefinedBehaviorSanitizer)
set -euo pipefail

cd "$(dirname "$0")/.."

mode=${1:-release}
shift || true
case "$mode" in
release)
    dir=build
    args=(-DCMAKE_BUILD_TYPE=Release -DHL_WERROR=ON)
    ;;
asan)
    dir=build-asan
    args=(-DCMAKE_BUILD_TYPE=Debug -DHL_SANITIZE=ON -DHL_WERROR=ON)
    ;;
-h | --help)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0 [release|asan] [cmake --build options]" >&2
    exit 2
    ;;
esac

cmake -S . -B "$dir" "${args[@]}"
cmake --build "$dir" -j2 "$@"
