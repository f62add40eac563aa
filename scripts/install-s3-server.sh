#!/usr/bin/env bash
# install-s3-server.sh - builds the S3-compatible server the snapshot tests run
# against (versitygw with its posix backend: a real S3 implementation, not a
# mock), cached outside the repository.
#
#   scripts/install-s3-server.sh        # prints the path of the binary
#
# The binary goes to ${XDG_CACHE_HOME:-$HOME/.cache}/harmonylite/bin/versitygw-<version>
# and is built only once. versitygw needs Go >= 1.25: the go on PATH (or
# /usr/local/go) is used when it is new enough; otherwise (Debian 12 ships Go
# 1.19) a Go toolchain is fetched through the Go module proxy, which is where
# `go` itself gets newer toolchains, and cached beside the binary.
set -euo pipefail

VERSITYGW_VERSION=v1.8.0
GO_TOOLCHAIN=go1.25.5
cache="${XDG_CACHE_HOME:-$HOME/.cache}/harmonylite"
bin="$cache/bin/versitygw-$VERSITYGW_VERSION"

if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache/bin"

# A go that can build versitygw: at least Go 1.25.
go_ok() {
    local v
    v=$("$1" env GOVERSION 2>/dev/null) || return 1
    v=${v#go}
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%.*}
    [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -ge 25 ]; }
}

go=""
# HL_S3_SERVER_OLD_GO=1 pretends the go found is too old: how a fresh Debian 12 machine builds it.
for cand in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go; do
    if [ -z "${HL_S3_SERVER_OLD_GO:-}" ] && [ -n "$cand" ] && [ -x "$cand" ] && go_ok "$cand"; then
        go=$cand
        break
    fi
done
if [ -z "$go" ]; then
    old=$(command -v go 2>/dev/null || true)
    if [ -z "$old" ]; then
        echo "install-s3-server: no go found (Debian: apt-get install golang-go)" >&2
        exit 1
    fi
    tc="$cache/toolchain/$GO_TOOLCHAIN"
    if [ ! -x "$tc/bin/go" ]; then
        echo "install-s3-server: fetching Go toolchain $GO_TOOLCHAIN through the module proxy" >&2
        json=$(GOPATH="$cache/gopath" GOFLAGS=-modcacherw GOTOOLCHAIN=local "$old" mod download -json \
            "golang.org/toolchain@v0.0.1-$GO_TOOLCHAIN.linux-amd64")
        dir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
        if [ -z "$dir" ] || [ ! -f "$dir/bin/go" ]; then
            echo "install-s3-server: toolchain download failed:" >&2
            printf '%s\n' "$json" >&2
            exit 1
        fi
        mkdir -p "$cache/toolchain"
        rm -rf "$tc.tmp"
        cp -r "$dir" "$tc.tmp"
        # module zips keep no file modes: the toolchain's programs must be made executable again
        chmod -R u+w "$tc.tmp"
        chmod +x "$tc.tmp"/bin/* "$tc.tmp"/pkg/tool/*/*
        mv "$tc.tmp" "$tc"
    fi
    go="$tc/bin/go"
fi

echo "install-s3-server: building versitygw $VERSITYGW_VERSION (a few minutes)" >&2
gobin=$(mktemp -d "$cache/bin/.build.XXXXXX")
trap 'rm -rf "$gobin"' EXIT
GOBIN="$gobin" GOTOOLCHAIN=local CGO_ENABLED=0 nice "$go" install \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION" >&2
mv "$gobin/versitygw" "$bin"
echo "$bin"
