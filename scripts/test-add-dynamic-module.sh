#!/usr/bin/env bash
# Check that the repository works as an nginx addon (config + config.make):
#
#   1. copy the vendored nginx source (the nginx-src crate in cargo's registry,
#      the same nginx the default `vendored` build uses) to a temp dir,
#   2. ./configure --with-compat --with-stream --add-dynamic-module=<repo>,
#   3. make modules (-> objs/ngx_stream_upsync_module.so), then make (objs/nginx),
#   4. objs/nginx -t on a stream config that loads the module and uses
#      `upsync` and `upstream_show`.
#
# Exits non-zero on any failure.  cargo builds into target/addmod (override
# with ADDMOD_TARGET_DIR); KEEP_TMP=1 keeps the temp dir.

set -euo pipefail

die() { printf 'test-add-dynamic-module: FAIL: %s\n' "$*" >&2; exit 1; }
note() { printf 'test-add-dynamic-module: %s\n' "$*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${ADDMOD_TARGET_DIR:-$ROOT/target/addmod}
JOBS=${JOBS:-2}

command -v cargo >/dev/null 2>&1 || die "cargo not found in PATH"
command -v make >/dev/null 2>&1 || die "make not found in PATH"

# --- the vendored nginx source ------------------------------------------------

ver=$(awk '/^name = "nginx-src"$/ { getline; gsub(/version = |"/, ""); print; exit }' \
    "$ROOT/Cargo.lock")
[ -n "$ver" ] || die "nginx-src not found in Cargo.lock"

CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
find_src() {
    ls -d "$CARGO_HOME"/registry/src/*/"nginx-src-$ver"/nginx 2>/dev/null | sed -n 1p
}
SRC=$(find_src)
if [ -z "$SRC" ]; then
    note "nginx-src $ver not in $CARGO_HOME/registry; running cargo fetch"
    cargo fetch --manifest-path "$ROOT/Cargo.toml" >&2 || die "cargo fetch failed"
    SRC=$(find_src)
fi
[ -n "$SRC" ] && [ -f "$SRC/auto/configure" ] ||
    die "vendored nginx source (nginx-src $ver) not found under $CARGO_HOME/registry/src"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/upsync-addmod-XXXXXX")
cleanup() {
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        note "keeping $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

note "copying $SRC to $TMP/nginx"
cp -a "$SRC" "$TMP/nginx"
chmod -R u+w "$TMP/nginx"
cd "$TMP/nginx"

# The crate ships nginx's sources with auto/configure (the release tarball
# layout has ./configure at the top; the repository layout does not).
if [ -x ./configure ]; then CONFIGURE=./configure; else CONFIGURE=auto/configure; fi

# --- configure, make ------------------------------------------------------------

t0=$(date +%s)
note "$CONFIGURE --with-compat --with-stream --add-dynamic-module=$ROOT"
$CONFIGURE --with-compat --with-stream --add-dynamic-module="$ROOT" \
    >"$TMP/configure.log" 2>&1 ||
    { tail -n 30 "$TMP/configure.log" >&2; die "configure failed"; }
grep -q 'ngx_stream_upsync_module was configured' "$TMP/configure.log" ||
    die "configure did not pick up the addon (see $TMP/configure.log)"
t1=$(date +%s)

note "make -j$JOBS modules (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
make -j"$JOBS" modules >"$TMP/make-modules.log" 2>&1 ||
    { tail -n 40 "$TMP/make-modules.log" >&2; die "make modules failed"; }
[ -f objs/ngx_stream_upsync_module.so ] ||
    die "make modules did not produce objs/ngx_stream_upsync_module.so"
t2=$(date +%s)

note "make -j$JOBS (nginx binary)"
make -j"$JOBS" >"$TMP/make.log" 2>&1 ||
    { tail -n 40 "$TMP/make.log" >&2; die "make failed"; }
[ -x objs/nginx ] || die "make did not produce objs/nginx"
t3=$(date +%s)

# --- nginx -t with the module loaded ---------------------------------------------

P=$TMP/prefix
mkdir -p "$P/logs"
cat >"$P/nginx.conf" <<EOF
load_module $TMP/nginx/objs/ngx_stream_upsync_module.so;
pid $P/nginx.pid;
error_log $P/error.log info;
events { }
stream {
    upstream x {
        upsync 127.0.0.1:8500/v1/kv/upstreams/x/ upsync_type=consul;
        upsync_dump_path $P/servers_x.conf;
        server 127.0.0.1:9;
    }
    server {
        listen 127.0.0.1:18080;
        proxy_pass x;
    }
    server {
        listen 127.0.0.1:18081;
        upstream_show;
    }
}
EOF

out=$(objs/nginx -t -p "$P/" -c "$P/nginx.conf" -e stderr 2>&1) || {
    printf '%s\n' "$out" >&2
    die "nginx -t failed with the module built via --add-dynamic-module"
}
printf '%s\n' "$out" | grep -q 'test is successful' || {
    printf '%s\n' "$out" >&2
    die "nginx -t did not report success"
}

# This nginx has no SSL (configured without any ssl module): an https:// registry
# is refused by nginx -t with a line that says why.
sed 's|upsync 127.0.0.1:8500/v1/kv/upstreams/x/|upsync https://127.0.0.1:8500/v1/kv/upstreams/x/|' \
    "$P/nginx.conf" >"$P/https.conf"
if out=$(objs/nginx -t -p "$P/" -c "$P/https.conf" -e stderr 2>&1); then
    printf '%s\n' "$out" >&2
    die "nginx -t accepted an https:// registry in an nginx without SSL"
fi
printf '%s\n' "$out" | grep -q 'https:// registries need nginx built with SSL' || {
    printf '%s\n' "$out" >&2
    die "nginx -t did not explain that https:// needs SSL"
}

note "configure $((t1 - t0))s, make modules $((t2 - t1))s, make $((t3 - t2))s"
printf 'test-add-dynamic-module: OK: %s loaded into %s, nginx -t passed\n' \
    objs/ngx_stream_upsync_module.so "objs/nginx ($(objs/nginx -v 2>&1 | sed 's/.*: //'))"
