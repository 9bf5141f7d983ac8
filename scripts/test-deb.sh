#!/usr/bin/env bash
# Smoke test of the .deb on this machine's Debian nginx:
#   1. builds it (scripts/package-deb.sh) and installs it with dpkg -i;
#   2. runs /usr/sbin/nginx with a private prefix and configuration that
#      `include /etc/nginx/modules-enabled/*.conf;` (so the link the package
#      created loads the module, after 50-mod-stream.conf), a real etcd and a
#      TCP backend, all on 127.0.0.1;
#   3. registers the backend in etcd (v3 JSON gateway), waits until
#      upstream_show lists it and checks a connection through nginx reaches it;
#   4. dpkg -r (the modules-enabled link must go), then dpkg --purge, so the
#      machine is left as it was.
# /etc/nginx/nginx.conf is not touched and the system nginx service is not
# started.  Everything started here is stopped by PID.  Exit status 0 and a
# final "PASS" line on success, non-zero and "FAIL: ..." otherwise.
#
# Environment: ETCD_BINARY (default /usr/bin/etcd), NGINX_BIN (default
# /usr/sbin/nginx), TEST_DEB_TIMEOUT seconds per wait (default 30),
# TEST_DEB_KEEP=1 keeps the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PKG=libnginx-mod-stream-upsync
LINK=/etc/nginx/modules-enabled/60-mod-stream-upsync.conf
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
ETCD_BINARY=${ETCD_BINARY:-/usr/bin/etcd}
TIMEOUT=${TEST_DEB_TIMEOUT:-30}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

DIR=""
ETCD_DIR=""
PIDS=()
NGINX_PID=""
PKG_INSTALLED=0
RESULT=FAIL
REASON="unexpected error"

say() { printf 'test-deb: %s\n' "$*"; }
fail() { REASON=$*; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [ -n "$NGINX_PID" ] && kill -0 "$NGINX_PID" 2>/dev/null; then
        kill -TERM "$NGINX_PID"
        for _ in $(seq 100); do kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.05; done
        kill -0 "$NGINX_PID" 2>/dev/null && kill -KILL "$NGINX_PID"
    fi
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$p" 2>/dev/null; done
    if [ "$PKG_INSTALLED" = 1 ]; then
        $SUDO dpkg --purge "$PKG" >/dev/null 2>&1 || say "warning: dpkg --purge $PKG failed"
    fi
    if [ "$RESULT" != PASS ] && [ -n "$DIR" ]; then
        for f in "$DIR/error.log" "$DIR/etcd.log"; do
            [ -s "$f" ] && { say "--- tail of $f"; tail -n 20 "$f"; }
        done
    fi
    [ -n "$ETCD_DIR" ] && rm -rf "$ETCD_DIR"
    if [ -n "$DIR" ]; then
        if [ "${TEST_DEB_KEEP:-0}" = 1 ]; then say "kept $DIR"; else rm -rf "$DIR"; fi
    fi
    if [ "$RESULT" = PASS ] && [ "$rc" -eq 0 ]; then
        say "PASS: $PKG built, installed with dpkg, loaded by Debian's nginx through modules-enabled, synced from etcd, removed"
    else
        [ "$RESULT" = PASS ] && REASON="exit status $rc"
        say "FAIL: $REASON"
        [ "$rc" -ne 0 ] || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'REASON="interrupted"; exit 130' INT TERM
trap 'REASON="command failed (line $LINENO): $BASH_COMMAND"' ERR

# wait_until SECONDS CMD...: poll CMD every 0.1 s until it succeeds.
wait_until() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# dpkg with a bounded wait for the dpkg lock (another apt/dpkg may be running).
dpkg_retry() {
    local out
    for _ in $(seq 120); do
        if out=$($SUDO dpkg "$@" 2>&1); then printf '%s\n' "$out"; return 0; fi
        printf '%s\n' "$out" | grep -q 'lock' || { printf '%s\n' "$out" >&2; return 1; }
        sleep 1
    done
    printf '%s\n' "$out" >&2
    return 1
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- prerequisites ---------------------------------------------------------------------

[ -x "$NGINX_BIN" ] || fail "$NGINX_BIN not found (apt-get install nginx libnginx-mod-stream nginx-dev)"
[ -x "$ETCD_BINARY" ] || fail "$ETCD_BINARY not found (apt-get install etcd-server)"
for t in curl python3 base64 dpkg; do
    command -v "$t" >/dev/null 2>&1 || fail "$t not found"
done
[ -e /etc/nginx/modules-enabled/50-mod-stream.conf ] ||
    fail "/etc/nginx/modules-enabled/50-mod-stream.conf missing (apt-get install libnginx-mod-stream)"
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q 'install ok installed'; then
    say "note: $PKG is already installed (an earlier run?); it is replaced and removed at the end"
fi

# --- build and install -----------------------------------------------------------------

say "building the package"
DEB=$(scripts/package-deb.sh 2>"${TMPDIR:-/tmp}/test-deb-package.$$.log" | tail -n1) || {
    cat "${TMPDIR:-/tmp}/test-deb-package.$$.log" >&2
    rm -f "${TMPDIR:-/tmp}/test-deb-package.$$.log"
    fail "scripts/package-deb.sh failed"
}
rm -f "${TMPDIR:-/tmp}/test-deb-package.$$.log"
[ -f "$DEB" ] || fail "scripts/package-deb.sh printed no .deb path (got '$DEB')"
say "built $DEB"

say "dpkg -i $(basename "$DEB")"
PKG_INSTALLED=1
dpkg_retry -i "$DEB" >/dev/null || fail "dpkg -i $DEB failed"
[ "$(readlink "$LINK")" = /usr/share/nginx/modules-available/mod-stream-upsync.conf ] ||
    fail "postinst did not create $LINK"
[ -f /usr/lib/nginx/modules/ngx_stream_upsync_module.so ] || fail "module not installed"
ORDER=$(cd /etc/nginx/modules-enabled && printf '%s\n' *.conf)
STREAM_AT=$(printf '%s\n' "$ORDER" | grep -nx '50-mod-stream.conf' | cut -d: -f1)
UPSYNC_AT=$(printf '%s\n' "$ORDER" | grep -nx '60-mod-stream-upsync.conf' | cut -d: -f1)
[ -n "$STREAM_AT" ] && [ -n "$UPSYNC_AT" ] && [ "$UPSYNC_AT" -gt "$STREAM_AT" ] ||
    fail "60-mod-stream-upsync.conf does not sort after 50-mod-stream.conf"

# --- etcd, backend, nginx --------------------------------------------------------------

DIR=$(mktemp -d "${TMPDIR:-/tmp}/test-deb.XXXXXX")
chmod 0755 "$DIR"
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    ETCD_DIR=$(mktemp -d /dev/shm/test-deb-etcd.XXXXXX)
else
    ETCD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/test-deb-etcd.XXXXXX")
fi

# Backend: binds an ephemeral port itself (no race), writes it to a file.
python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(64)
open(sys.argv[1] + ".tmp", "w").write(str(s.getsockname()[1]))
__import__("os").rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    c, _ = s.accept(); c.sendall(b"backend-ok\n"); c.close()
' "$DIR/backend.port" &
PIDS+=($!)
wait_until "$TIMEOUT" test -s "$DIR/backend.port" || fail "the backend did not start"
BACKEND=$(cat "$DIR/backend.port")

ETCD_PORT=$(free_port); PEER_PORT=$(free_port)
"$ETCD_BINARY" --name smoke --data-dir "$ETCD_DIR/data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
    --initial-cluster "smoke=http://127.0.0.1:$PEER_PORT" --enable-v2=true \
    --logger=zap --log-level=warn --heartbeat-interval=10 --election-timeout=100 >"$DIR/etcd.log" 2>&1 &
PIDS+=($!)
ETCD_PID=$!
etcd_healthy() { kill -0 "$ETCD_PID" && curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
wait_until "$TIMEOUT" etcd_healthy || fail "etcd did not become healthy on 127.0.0.1:$ETCD_PORT"

# A port nothing listens on: the configured server is never used once the
# registry's set is applied.
CLOSED=$(free_port)
LISTEN=$(free_port); SHOW=$(free_port)

# load_module paths in modules-available are relative to the prefix
# (Debian: /usr/share/nginx/modules -> /usr/lib/nginx/modules).
ln -s /usr/lib/nginx/modules "$DIR/modules"
cat >"$DIR/nginx.conf" <<EOF
include /etc/nginx/modules-enabled/*.conf;
worker_processes 2;
pid $DIR/nginx.pid;
error_log $DIR/error.log notice;
$([ "$(id -u)" -eq 0 ] && echo 'user root;')
events {}
stream {
    upstream smoke {
        upsync 127.0.0.1:$ETCD_PORT/upstreams/smoke/ upsync_type=etcdv3 upsync_interval=1s;
        upsync_dump_path $DIR/servers_smoke.conf;
        server 127.0.0.1:$CLOSED;
    }
    server { listen 127.0.0.1:$LISTEN; proxy_pass smoke; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:$SHOW; upstream_show; }
}
EOF

"$NGINX_BIN" -t -p "$DIR" -c "$DIR/nginx.conf" -e "$DIR/error.log" >"$DIR/nginx-t.log" 2>&1 || {
    cat "$DIR/nginx-t.log" >&2; fail "nginx -t failed with the packaged module"
}
"$NGINX_BIN" -p "$DIR" -c "$DIR/nginx.conf" -e "$DIR/error.log" || fail "nginx did not start"
wait_until "$TIMEOUT" test -s "$DIR/nginx.pid" || fail "nginx wrote no pid file"
NGINX_PID=$(cat "$DIR/nginx.pid")
say "nginx $("$NGINX_BIN" -v 2>&1 | sed 's|.*/||') (pid $NGINX_PID), etcd on 127.0.0.1:$ETCD_PORT, backend on 127.0.0.1:$BACKEND"

# --- register the backend and check the path through nginx -----------------------------

b64() { printf '%s' "$1" | base64 -w0; }
curl -sf --max-time 5 -X POST "http://127.0.0.1:$ETCD_PORT/v3/kv/put" \
    -d "{\"key\":\"$(b64 "/upstreams/smoke/127.0.0.1:$BACKEND")\",\"value\":\"$(b64 '{}')\"}" >/dev/null ||
    fail "etcd v3 put failed"

show() { curl -s --max-time 2 "http://127.0.0.1:$SHOW/"; }
show_lists_backend() { show | grep -q "server 127.0.0.1:$BACKEND "; }
wait_until "$TIMEOUT" show_lists_backend ||
    fail "upstream_show did not list 127.0.0.1:$BACKEND within ${TIMEOUT}s: $(show | tr '\n' ' ')"
show | grep -q 'Upstream name: smoke; Backend server count: 1' ||
    fail "unexpected upstream_show report: $(show | tr '\n' ' ')"
say "upstream_show lists 127.0.0.1:$BACKEND"

through_nginx() {
    python3 -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
print(s.makefile().readline().strip())
' "$LISTEN"
}
REPLY=$(through_nginx) || fail "cannot connect through nginx on 127.0.0.1:$LISTEN"
[ "$REPLY" = backend-ok ] || fail "through nginx: expected 'backend-ok', got '$REPLY'"
say "127.0.0.1:$LISTEN -> backend: $REPLY"
grep -q "server 127.0.0.1:$BACKEND " "$DIR/servers_smoke.conf" ||
    fail "dump file $DIR/servers_smoke.conf does not list the backend"

# --- stop nginx, remove the package ----------------------------------------------------

kill -QUIT "$NGINX_PID"
wait_until "$TIMEOUT" sh -c "! kill -0 $NGINX_PID 2>/dev/null" || fail "nginx did not exit after SIGQUIT"
NGINX_PID=""

say "dpkg -r $PKG"
dpkg_retry -r "$PKG" >/dev/null || fail "dpkg -r $PKG failed"
[ ! -e "$LINK" ] && [ ! -L "$LINK" ] || fail "$LINK still exists after dpkg -r"
[ ! -e /usr/lib/nginx/modules/ngx_stream_upsync_module.so ] || fail "the module is still installed after dpkg -r"
# Like Debian's libnginx-mod-*, removal keeps a *.removed marker (not matched by
# modules-enabled/*.conf) until purge; purge to leave no trace.
dpkg_retry --purge "$PKG" >/dev/null || fail "dpkg --purge $PKG failed"
PKG_INSTALLED=0
[ ! -L "$LINK.removed" ] || fail "$LINK.removed still exists after dpkg --purge"
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -qv 'not-installed'; then
    fail "dpkg still knows $PKG after purge: $(dpkg-query -W -f='${Status}' "$PKG")"
fi
say "removed: no $LINK, no module, no package state"

RESULT=PASS
