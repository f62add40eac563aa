#!/usr/bin/env bash
# install-go-tools.sh - builds Go tools the tests need, caches them outside the
# repository, and prints each one's path (one line per tool, in order).
#
#   scripts/install-go-tools.sh nats-server|helm|kustomize|nats [...]   (nats: natscli)
#
# Tools and their pinned versions are in the table below. A tool already built
# is only printed. Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/harmonylite/go-tools.
#
# The go used is the first of: $HL_GO, `go` on PATH, /usr/local/go/bin/go, as
# long as it is at least GO_MIN. Otherwise (Debian 12's golang-go is 1.19, too
# old for current tools) that older go fetches the pinned toolchain as a Go
# module through the module proxy (golang.org/toolchain, the way go >= 1.21
# switches toolchains itself), and the toolchain builds the tools.
# HL_GO_FORCE_TOOLCHAIN=1 takes that path even when a new enough go exists.
set -euo pipefail

GO_MIN=1.25
GO_TOOLCHAIN=1.25.14

# tool -> module@version (the binary is named after the tool)
tool_module() {
    case "$1" in
    nats-server) echo "github.com/nats-io/nats-server/v2@v2.12.15" ;;
    helm) echo "helm.sh/helm/v3/cmd/helm@v3.19.0" ;;
    kustomize) echo "sigs.k8s.io/kustomize/kustomize/v5@v5.7.1" ;;
    nats) echo "github.com/nats-io/natscli/nats@v0.4.0" ;;
    *) return 1 ;;
    esac
}

cache=${XDG_CACHE_HOME:-$HOME/.cache}/harmonylite/go-tools
log_file=$(mktemp "${TMPDIR:-/tmp}/install-go-tools.XXXXXX")
trap 'rm -f "$log_file"' EXIT

die() {
    echo "install-go-tools: $*" >&2
    exit 1
}

run_quiet() {
    if ! "$@" >>"$log_file" 2>&1; then
        echo "install-go-tools: failed: $*" >&2
        cat "$log_file" >&2
        exit 1
    fi
}

# "go1.25.3" / "go1.19.8" -> exit 0 when >= GO_MIN.
go_new_enough() {
    local v
    v=$("$1" env GOVERSION 2>/dev/null) || return 1
    v=${v#go}
    [ "$(printf '%s\n%s\n' "$GO_MIN" "$v" | sort -V | head -n1)" = "$GO_MIN" ]
}

find_go() {
    local cand any=""
    for cand in "${HL_GO:-}" "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
        [ -n "$cand" ] && [ -x "$cand" ] || continue
        [ -z "$any" ] && any=$cand
        if [ "${HL_GO_FORCE_TOOLCHAIN:-0}" != 1 ] && go_new_enough "$cand"; then
            echo "$cand"
            return 0
        fi
    done
    [ -n "$any" ] || die "no go found: install Debian's golang-go (scripts/install-deps.sh does) or set HL_GO"
    # Too old (or forced): fetch the pinned toolchain with it.
    local root="$cache/toolchain/go$GO_TOOLCHAIN"
    if [ ! -x "$root/bin/go" ]; then
        local mod="golang.org/toolchain@v0.0.1-go$GO_TOOLCHAIN.linux-$(uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/')"
        local dir
        mkdir -p "$cache/toolchain"
        dir=$(GOMODCACHE="$cache/gomod" GOFLAGS=-modcacherw GO111MODULE=on GOTOOLCHAIN=local \
            "$any" mod download -json "$mod" 2>>"$log_file" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p') ||
            true
        [ -n "$dir" ] && [ -d "$dir" ] || {
            cat "$log_file" >&2
            die "cannot download $mod through the module proxy"
        }
        rm -rf "$root.tmp"
        cp -r "$dir" "$root.tmp"
        chmod -R u+w "$root.tmp"
        # Module zips carry no file modes.
        chmod +x "$root.tmp"/bin/* "$root.tmp"/pkg/tool/*/*
        mv "$root.tmp" "$root"
    fi
    echo "$root/bin/go"
}

[ "$#" -gt 0 ] || die "usage: $0 tool... (known: nats-server helm kustomize nats)"
for tool in "$@"; do
    tool_module "$tool" >/dev/null || die "unknown tool: $tool"
done

go_bin=""
for tool in "$@"; do
    modver=$(tool_module "$tool")
    dest="$cache/$tool-${modver##*@}"
    if [ ! -x "$dest/bin/$tool" ]; then
        [ -n "$go_bin" ] || go_bin=$(find_go)
        rm -rf "$dest.tmp"
        mkdir -p "$dest.tmp/bin"
        run_quiet env GOBIN="$dest.tmp/bin" GOMODCACHE="$cache/gomod" GOFLAGS=-modcacherw GOTOOLCHAIN=local \
            CGO_ENABLED=0 "$go_bin" install "$modver"
        rm -rf "$dest"
        mv "$dest.tmp" "$dest"
    fi
    echo "$dest/bin/$tool"
done
