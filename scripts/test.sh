#!/usr/bin/env bash
# test.sh - THE test command (CI runs it through .ci/run).
#
#   1. scripts/install-deps.sh
#   2. release build (build/):       ctest, then the e2e suite (tests/e2e) against build/harmonylite
#      then the cluster/replication e2e tests with a current nats-server (nats-current)
#      then the Helm chart and kustomize overlays (deploy: tests/deploy)
#   3. ASan+UBSan build (build-asan/): ctest, then the e2e suite against build-asan/harmonylite
#   4. fuzz: every libFuzzer harness in fuzz/ briefly over its seed corpus (scripts/fuzz.sh)
#
# Exits non-zero when anything fails (a build, a test, a suite that ran no test).
# Ends with a summary whose last line is "N passed, M failed" over all suites.
#
# Environment:
#   HL_E2E_TIMEOUT   seconds one e2e run may take before it is killed (default 1500)
#   HL_CTEST_TIMEOUT seconds one ctest run may take (default 900)
#   HL_TEST_PHASES   phases to run, default "release nats-current deploy asan fuzz"
#   HL_FUZZ_SECONDS  seconds each fuzz harness runs (default 20)
#   PYTEST_ADDOPTS   extra pytest options (e.g. "-k replicates -x")
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

# JUnit files and the e2e nodes' directories (databases, logs); kept when something failed.
results=$(mktemp -d "${TMPDIR:-/tmp}/hl-test.XXXXXX")
keep_results=0
trap '[ "$keep_results" = 1 ] || rm -rf "$results"' EXIT

total_pass=0
total_fail=0
total_skip=0
summary=()
started_at=$SECONDS

note() { printf '\n==> %s\n' "$*"; }

# add_row NAME PASS FAIL SKIP SECONDS [EXTRA]
add_row() {
    total_pass=$((total_pass + $2))
    total_fail=$((total_fail + $3))
    total_skip=$((total_skip + $4))
    local line
    line=$(printf '%-16s %4d passed, %4d failed, %4d skipped  (%ss)%s' "$1" "$2" "$3" "$4" "$5" "${6:+  $6}")
    summary+=("$line")
}

# junit_counts FILE -> "PASS FAIL SKIP" counted from the <testcase> elements of a
# JUnit XML file (pytest's and ctest's both), or nothing when it cannot be read.
junit_counts() {
    python3 - "$1" <<'PY' 2>/dev/null
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
passed = failed = skipped = 0
for tc in root.iter("testcase"):
    if tc.find("failure") is not None or tc.find("error") is not None:
        failed += 1
    elif tc.find("skipped") is not None or tc.get("status") in ("notrun", "disabled"):
        skipped += 1
    else:
        passed += 1
print(passed, failed, skipped)
PY
}

# run_suite NAME RC JUNIT SECONDS ALLOW_EMPTY - turns a runner's exit code and
# JUnit file into a summary row. A non-zero exit code always counts as at least
# one failure, even when the JUnit file has none (crash, timeout, no tests).
run_suite() {
    local name=$1 rc=$2 junit=$3 secs=$4 allow_empty=$5
    local counts pass=0 fail=0 skip=0 extra=""
    counts=$(junit_counts "$junit" || true)
    if [ -n "$counts" ]; then
        read -r pass fail skip <<<"$counts"
    else
        extra="no result file"
    fi
    if [ "$rc" -ne 0 ] && [ "$fail" -eq 0 ]; then
        fail=1
        case "$rc" in
        124 | 137) extra="timed out" ;;
        5) extra="no tests collected (pytest exit 5)" ;;
        *) extra="${extra:+$extra, }runner exited $rc" ;;
        esac
    elif [ $((pass + fail + skip)) -eq 0 ]; then
        if [ "$allow_empty" = yes ]; then
            extra="no tests found"
        else
            fail=1
            extra="ran no test"
        fi
    fi
    add_row "$name" "$pass" "$fail" "$skip" "$secs" "$extra"
}

# --- 1. dependencies ---------------------------------------------------------
note "install-deps"
t0=$SECONDS
if bash scripts/install-deps.sh; then
    add_row "install-deps" 0 0 0 $((SECONDS - t0))
else
    add_row "install-deps" 0 1 0 $((SECONDS - t0)) "failed"
    printf '\n==================== summary ====================\n'
    printf '%s\n' "${summary[@]}"
    echo "$total_pass passed, $total_fail failed"
    exit 1
fi

# --- 2./3. one phase per build flavour ----------------------------------------
# phase MODE BUILD_DIR
phase() {
    local mode=$1 dir=$2 t0 rc
    local -a envs=()
    if [ "$mode" = asan ]; then
        envs=(ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
    fi

    note "build $mode"
    t0=$SECONDS
    if ! bash scripts/build.sh "$mode"; then
        add_row "build $mode" 0 1 0 $((SECONDS - t0)) "build failed; its tests were not run"
        return
    fi
    add_row "build $mode" 0 0 0 $((SECONDS - t0))

    note "ctest ($mode)"
    t0=$SECONDS
    env "${envs[@]}" timeout -k 15 "${HL_CTEST_TIMEOUT:-900}" \
        ctest --test-dir "$dir" --output-on-failure --output-junit "$results/ctest-$mode.xml"
    rc=$?
    run_suite "ctest $mode" "$rc" "$results/ctest-$mode.xml" $((SECONDS - t0)) yes

    note "e2e ($mode) against $dir/harmonylite"
    t0=$SECONDS
    env "${envs[@]}" HARMONYLITE_BIN="$ROOT/$dir/harmonylite" \
        timeout -k 15 "${HL_E2E_TIMEOUT:-1500}" \
        python3 -m pytest tests/e2e -q -rfEs -p no:cacheprovider --tb=short -o faulthandler_timeout=300 \
        --basetemp="$results/e2e-$mode" --junitxml="$results/e2e-$mode.xml"
    rc=$?
    run_suite "e2e $mode" "$rc" "$results/e2e-$mode.xml" $((SECONDS - t0)) no
}

# The cluster/replication e2e tests again, with a current nats-server release
# (scripts/install-go-tools.sh builds it; Debian's 2.9.10 runs everything else).
# Needs the release build. A nats-server that cannot be built fails the phase.
nats_current_phase() {
    local t0 rc bin
    note "e2e (release) with a current nats-server"
    t0=$SECONDS
    if ! bin=$(bash scripts/install-go-tools.sh nats-server); then
        add_row "e2e nats-current" 0 1 0 $((SECONDS - t0)) "install-go-tools.sh nats-server failed"
        return
    fi
    HL_NATS_SERVER="$bin" HARMONYLITE_BIN="$ROOT/build/harmonylite" \
        timeout -k 15 "${HL_E2E_TIMEOUT:-1500}" \
        python3 -m pytest tests/e2e/test_replication.py tests/e2e/test_discovery.py -q -rfEs -p no:cacheprovider \
        --tb=short -o faulthandler_timeout=300 \
        --basetemp="$results/e2e-nats-current" --junitxml="$results/e2e-nats-current.xml"
    rc=$?
    run_suite "e2e nats-current" "$rc" "$results/e2e-nats-current.xml" $((SECONDS - t0)) no
}

# The Helm chart and the kustomize overlays (tests/deploy): helm lint, render,
# offline validation against the Kubernetes API schemas, and the rendered
# configuration checked by build/harmonylite. helm and kustomize come from
# scripts/install-go-tools.sh.
deploy_phase() {
    local t0 rc helm kustomize
    note "deploy: Helm chart and kustomize overlays"
    t0=$SECONDS
    if ! helm=$(bash scripts/install-go-tools.sh helm) || ! kustomize=$(bash scripts/install-go-tools.sh kustomize); then
        add_row "deploy" 0 1 0 $((SECONDS - t0)) "install-go-tools.sh helm kustomize failed"
        return
    fi
    HL_HELM="$helm" HL_KUSTOMIZE="$kustomize" HARMONYLITE_BIN="$ROOT/build/harmonylite" \
        timeout -k 15 1500 python3 -m pytest tests/deploy -q -rfEs -p no:cacheprovider --tb=short \
        --junitxml="$results/deploy.xml"
    rc=$?
    run_suite "deploy" "$rc" "$results/deploy.xml" $((SECONDS - t0)) no
}

fuzz_phase() {
    local t0 rc
    note "fuzz"
    t0=$SECONDS
    timeout -k 15 300 scripts/fuzz.sh "${HL_FUZZ_SECONDS:-20}"
    rc=$?
    local n
    n=$(ls fuzz/fuzz_*.c | wc -l)
    if [ "$rc" -eq 0 ]; then
        add_row "fuzz" "$n" 0 0 $((SECONDS - t0)) "$n harnesses, no crash"
    else
        add_row "fuzz" 0 1 0 $((SECONDS - t0)) "fuzz.sh exited $rc"
    fi
}

for p in ${HL_TEST_PHASES:-release nats-current deploy asan fuzz}; do
    case "$p" in
    release) phase release build ;;
    nats-current) nats_current_phase ;;
    deploy) deploy_phase ;;
    asan) phase asan build-asan ;;
    fuzz) fuzz_phase ;;
    *) add_row "phase $p" 0 1 0 0 "unknown phase" ;;
    esac
done

printf '\n==================== summary (%ss) ====================\n' $((SECONDS - started_at))
printf '%s\n' "${summary[@]}"
if [ "$total_skip" -gt 0 ]; then
    echo "($total_skip skipped)"
fi
if [ "$total_fail" -gt 0 ]; then
    keep_results=1
    echo "(node logs and databases of the e2e runs kept in $results)"
fi
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
