#!/usr/bin/env bash
# fuzz.sh - builds every libFuzzer harness in fuzz/ and runs each briefly over
# its seed corpus (fuzz/corpus/<name>/), with ASan and UBSan.
#
#   scripts/fuzz.sh [seconds-per-harness]    (default 20)
#
# Needs clang (scripts/install-deps.sh installs it). New inputs found are
# written to a scratch copy of the corpus, never into the repository; a crash
# leaves its reproducer in build-fuzz/ and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
out=build-fuzz
mkdir -p "$out"
cc=${FUZZ_CC:-clang}
common=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -D_GNU_SOURCE -Isrc)
libs_changeset=$(pkg-config --cflags --libs libcbor libzstd)
libs_config=$(pkg-config --cflags --libs yaml-0.1)
libs_discovery=$(pkg-config --cflags --libs libcares libcrypto)
libs_manifest=$(pkg-config --cflags --libs libcjson)
libs_http=$(pkg-config --cflags --libs libmicrohttpd libcjson libcrypto)
libs_registry=$(pkg-config --cflags --libs libcjson)

# Fail loudly, and say why, when the toolchain cannot build a fuzzer at all
# (clang's fuzzer and sanitizer runtimes are Debian's libclang-rt-dev).
probe=$(mktemp -d)
printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
    >"$probe/probe.c"
if ! "$cc" -fsanitize=fuzzer,address,undefined "$probe/probe.c" -o "$probe/probe" >"$probe/log" 2>&1; then
    echo "fuzz.sh: $cc cannot link a libFuzzer harness; install clang and libclang-rt-dev" \
        "(scripts/install-deps.sh does). The linker said:" >&2
    cat "$probe/log" >&2
    rm -rf "$probe"
    exit 1
fi
rm -rf "$probe"

build() { # name sources... -- libs
    local name=$1
    shift
    echo "==> building fuzz_$name"
    "$cc" "${common[@]}" "$@" -lm -lpthread -o "$out/fuzz_$name"
}

build changeset fuzz/fuzz_changeset.c src/repl/changeset.c src/common/buf.c src/common/status.c $libs_changeset
build config fuzz/fuzz_config.c src/config/config.c src/common/buf.c src/common/status.c src/common/log.c \
    src/common/hlc.c $libs_config

build manifest fuzz/fuzz_manifest.c src/snapshot/manifest.c src/common/status.c $libs_manifest
build http fuzz/fuzz_http.c src/http/http.c src/http/state.c src/common/buf.c src/common/status.c \
    src/common/log.c src/common/hlc.c $libs_http
build s3xml fuzz/fuzz_s3xml.c src/snapshot/s3xml.c src/snapshot/manifest.c src/common/status.c $libs_manifest

fail=0
build discovery fuzz/fuzz_discovery.c src/natsio/discovery.c src/natsio/server.c src/natsio/nkey.c src/common/buf.c \
    src/common/status.c src/common/log.c src/common/hlc.c $libs_discovery

build registry fuzz/fuzz_registry.c src/registry/entry.c $libs_registry

for name in changeset config discovery http manifest registry s3xml; do
    work="$out/corpus-$name"
    rm -rf "$work"
    cp -r "fuzz/corpus/$name" "$work"
    echo "==> fuzz_$name for ${secs}s"
    if ! (cd "$out" && "./fuzz_$name" -max_total_time="$secs" -print_final_stats=1 "corpus-$name" 2>&1 |
        tail -n 15); then
        fail=1
    fi
    if ls "$out"/crash-* "$out"/leak-* "$out"/timeout-* >/dev/null 2>&1; then
        echo "fuzz_$name found a problem; reproducers:" "$out"/crash-* "$out"/leak-* "$out"/timeout-* 2>/dev/null
        fail=1
    fi
done
exit $fail
