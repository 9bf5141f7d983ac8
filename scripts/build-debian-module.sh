#!/usr/bin/env bash
# Build ngx_stream_upsync_module ABI-matched to Debian's packaged nginx.
#
#   scripts/build-debian-module.sh            # -> target/debian/ngx_stream_upsync_module.so
#
# How: nginx-sys generates its bindings (and NGX_RS_MODULE_SIGNATURE) from a
# *configured* nginx tree.  nginx-dev ships the patched source Debian built
# from (/usr/share/nginx/src) but without objs/, so we copy it, run
# ./configure with the arguments the installed binary reports in `nginx -V`,
# and point cargo at the resulting objs/ directory.  Nothing is compiled in
# the nginx tree itself: only objs/ngx_auto_config.h, objs/ngx_auto_headers.h
# and objs/Makefile (include paths, -D flags) are needed.
#
# Environment (all optional):
#   NGINX_BIN         nginx binary to match      (default /usr/sbin/nginx)
#   NGINX_DEV_SRC     nginx-dev source tree      (default /usr/share/nginx/src)
#   NGINX_WORK_DIR    configured copy            (default target/debian-nginx-src)
#   DEBIAN_TARGET_DIR cargo target dir           (default target/debian; a
#                     CARGO_TARGET_DIR from the environment is ignored so
#                     the vendored build's target dir is never clobbered)
#   CARGO             cargo binary               (default cargo)
#
# Idempotent: the configured copy is reused while the configure arguments,
# the nginx version and the nginx-dev tree are unchanged; cargo rebuilds only
# what changed.

set -euo pipefail

die() { printf 'build-debian-module: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'build-debian-module: %s\n' "$*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
NGINX_DEV_SRC=${NGINX_DEV_SRC:-/usr/share/nginx/src}
NGINX_WORK_DIR=${NGINX_WORK_DIR:-$ROOT/target/debian-nginx-src}
export CARGO_TARGET_DIR=${DEBIAN_TARGET_DIR:-$ROOT/target/debian}
CARGO=${CARGO:-cargo}

INSTALL_HINT='apt-get install nginx-dev libnginx-mod-stream'

# --- prerequisites ----------------------------------------------------------

[ -x "$NGINX_BIN" ] ||
    die "$NGINX_BIN not found: install Debian's nginx ($INSTALL_HINT)"
[ -f "$NGINX_DEV_SRC/configure" ] && [ -f "$NGINX_DEV_SRC/src/core/nginx.h" ] ||
    die "nginx source tree not found at $NGINX_DEV_SRC: the nginx-dev package is missing ($INSTALL_HINT)"
[ -f "$NGINX_DEV_SRC/src/stream/ngx_stream.h" ] ||
    die "$NGINX_DEV_SRC has no src/stream: incomplete nginx-dev ($INSTALL_HINT)"
command -v "$CARGO" >/dev/null 2>&1 ||
    die "cargo not found in PATH (install Rust, e.g. via rustup)"

if [ ! -f /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    note "warning: /usr/lib/nginx/modules/ngx_stream_module.so is missing;" \
         "the module builds but cannot be loaded without it ($INSTALL_HINT)"
fi

NGINX_V=$("$NGINX_BIN" -V 2>&1) || die "'$NGINX_BIN -V' failed: $NGINX_V"
NGINX_VERSION=$(printf '%s\n' "$NGINX_V" | sed -n 's|^nginx version: nginx/||p' | sed -n 1p)
SRC_VERSION=$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$NGINX_DEV_SRC/src/core/nginx.h")
[ -n "$NGINX_VERSION" ] || die "cannot read the version from '$NGINX_BIN -V'"
[ "$NGINX_VERSION" = "$SRC_VERSION" ] ||
    die "$NGINX_BIN is nginx $NGINX_VERSION but $NGINX_DEV_SRC is nginx $SRC_VERSION: nginx and nginx-dev versions differ (apt-get install --only-upgrade nginx-core nginx-dev libnginx-mod-stream)"

RAW_ARGS=$(printf '%s\n' "$NGINX_V" | sed -n 's/^configure arguments: //p')
[ -n "$RAW_ARGS" ] || die "'$NGINX_BIN -V' printed no 'configure arguments:' line"

# --- parse the configure arguments ------------------------------------------
# They are shell-quoted (--with-cc-opt='-g -O2 ...').  xargs understands
# single/double quotes and backslashes the way the shell does for this kind of
# line, without evaluating anything ($(...), globs and variables stay literal).

mapfile -d '' -t ALL_ARGS < <(printf '%s' "$RAW_ARGS" | xargs printf '%s\0') ||
    die "cannot parse the configure arguments: $RAW_ARGS"
[ "${#ALL_ARGS[@]}" -gt 0 ] || die "no configure arguments parsed from: $RAW_ARGS"

ARGS=()
DROPPED=()
for a in "${ALL_ARGS[@]}"; do
    case $a in
    --add-module=*|--add-dynamic-module=*)
        # Third-party modules built into a Debian nginx flavour (or shipped
        # as libnginx-mod-*): their sources are not part of nginx-dev, and
        # configure aborts with "no <dir>/config was found" when the
        # directory is missing, so such an entry is dropped.  Kept when the
        # directory exists, so objs/ is as close to Debian's as possible.
        # (A dynamic module never changes core/stream layouts or the module
        # signature; a static one could only through its own headers, which
        # a stream module does not include.)
        path=${a#*=}
        if [ -f "$path/config" ]; then
            ARGS+=("$a")
        else
            DROPPED+=("$a  (module source $path not present)")
        fi
        ;;
    *)
        # Everything else is kept as is: --with-compat, --with-debug,
        # --with-threads, the ssl/v2/realip/... modules and --with-cc-opt
        # all influence ngx_auto_config.h, struct layouts or the signature.
        # The paths (--prefix, --conf-path, temp paths, the
        # -ffile-prefix-map= in --with-cc-opt) need not exist at configure
        # time and are not checked by configure.
        ARGS+=("$a")
        ;;
    esac
done

# Dynamic modules that need an extra -dev library at configure time
# (libgeoip-dev, libgd-dev, libperl-dev, libxslt1-dev).  nginx-dev depends on
# all of these, so normally they are present and the arguments are kept.  If
# configure fails with them, it is retried without them: they are separate
# .so files in Debian (libnginx-mod-http-geoip, ...), add nothing to the core,
# http or stream structures (the only define they set that others read,
# NGX_HTTP_X_FORWARDED_FOR, is set by --with-compat anyway) and do not enter
# NGX_MODULE_SIGNATURE, so the ABI seen by this module is unchanged.
OPTIONAL_LIB_MODULES=(
    --with-http_geoip_module=dynamic --with-stream_geoip_module=dynamic
    --with-http_image_filter_module=dynamic --with-http_perl_module=dynamic
    --with-http_xslt_module=dynamic
)

# Sanity: without these the result cannot work with Debian's nginx.
have_arg() { local x; for x in "${ARGS[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
have_arg --with-compat ||
    die "$NGINX_BIN was not configured --with-compat: dynamic modules built outside Debian cannot be loaded into it"
have_arg --with-stream=dynamic || have_arg --with-stream ||
    die "$NGINX_BIN was built without the stream module"

for d in "${DROPPED[@]+"${DROPPED[@]}"}"; do note "dropping configure argument: $d"; done

# --- configure a copy of the nginx-dev tree (or reuse it) --------------------

STAMP_FILE=$NGINX_WORK_DIR/.upsync-configure-stamp
CONFIGURE_LOG=$NGINX_WORK_DIR/upsync-configure.log
stamp() {
    printf 'nginx-bin: %s\n' "$(readlink -f "$NGINX_BIN")"
    printf 'nginx -V: %s\n' "$NGINX_V"
    printf 'nginx-dev: %s\n' "$(cd "$NGINX_DEV_SRC" && find . -type f -printf '%P %s %T@\n' | LC_ALL=C sort | md5sum)"
    printf 'arg: %s\n' "${ARGS[@]}"
}
WANT_STAMP=$(stamp)

run_configure() {
    (cd "$NGINX_WORK_DIR" && ./configure "$@") >"$CONFIGURE_LOG" 2>&1
}

if [ -f "$STAMP_FILE" ] && [ -f "$NGINX_WORK_DIR/objs/ngx_auto_config.h" ] &&
   [ -f "$NGINX_WORK_DIR/objs/Makefile" ] &&
   [ "$(cat "$STAMP_FILE")" = "$WANT_STAMP" ]; then
    note "reusing configured tree $NGINX_WORK_DIR"
    if [ -f "$NGINX_WORK_DIR/.upsync-dropped" ]; then
        while IFS= read -r d; do note "(configured without $d)"; done <"$NGINX_WORK_DIR/.upsync-dropped"
    fi
else
    note "configuring nginx $SRC_VERSION in $NGINX_WORK_DIR"
    rm -rf "$NGINX_WORK_DIR"
    mkdir -p "$(dirname "$NGINX_WORK_DIR")"
    cp -a "$NGINX_DEV_SRC" "$NGINX_WORK_DIR"
    # nginx-dev is installed read-only for users; make the copy writable.
    chmod -R u+w "$NGINX_WORK_DIR"
    : >"$NGINX_WORK_DIR/.upsync-dropped"
    if ! run_configure "${ARGS[@]}"; then
        err=$(grep -E 'error:' "$CONFIGURE_LOG" | tail -n1 || true)
        REDUCED=()
        for a in "${ARGS[@]}"; do
            skip=0
            for o in "${OPTIONAL_LIB_MODULES[@]}"; do
                if [ "$a" = "$o" ]; then skip=1; fi
            done
            if [ "$skip" = 1 ]; then
                printf '%s\n' "$a" >>"$NGINX_WORK_DIR/.upsync-dropped"
            else
                REDUCED+=("$a")
            fi
        done
        [ "${#REDUCED[@]}" -lt "${#ARGS[@]}" ] || {
            tail -n 30 "$CONFIGURE_LOG" >&2
            die "./configure failed in $NGINX_WORK_DIR (full log: $CONFIGURE_LOG)"
        }
        note "./configure failed (${err:-see $CONFIGURE_LOG}); retrying without the" \
             "library-dependent dynamic modules:"
        while IFS= read -r d; do note "dropping configure argument: $d"; done <"$NGINX_WORK_DIR/.upsync-dropped"
        if ! run_configure "${REDUCED[@]}"; then
            tail -n 30 "$CONFIGURE_LOG" >&2
            die "./configure failed in $NGINX_WORK_DIR (full log: $CONFIGURE_LOG)"
        fi
    fi
    printf '%s\n' "$WANT_STAMP" >"$STAMP_FILE"
fi

# The module signature the configured tree will produce must equal the one
# compiled into the binary, else nginx refuses the module ("is not binary
# compatible").  Compare up front for a clear message.
BIN_SIG=$(grep -aoE '[0-9]+,[0-9]+,[0-9]+,[01]{30,}' "$NGINX_BIN" | head -n1 || true)
if [ -n "$BIN_SIG" ] && command -v cc >/dev/null 2>&1; then
    sig_c=$NGINX_WORK_DIR/objs/upsync_signature.c
    cat >"$sig_c" <<'EOF'
#include <ngx_config.h>
#include <ngx_core.h>
#include <stdio.h>
int main(void) { printf("%s\n", NGX_MODULE_SIGNATURE); return 0; }
EOF
    if (cd "$NGINX_WORK_DIR" &&
        cc -I src/core -I src/event -I src/event/modules -I src/os/unix -I objs \
           -o objs/upsync_signature "$sig_c") 2>/dev/null; then
        TREE_SIG=$("$NGINX_WORK_DIR/objs/upsync_signature")
        [ "$TREE_SIG" = "$BIN_SIG" ] ||
            die "module signature mismatch: $NGINX_BIN has $BIN_SIG, configured tree gives $TREE_SIG"
        note "module signature $TREE_SIG matches $NGINX_BIN"
    else
        note "warning: could not compile the signature check; skipping it"
    fi
fi

# --- build the module -------------------------------------------------------

note "cargo build --release --no-default-features (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
NGINX_BUILD_DIR=$NGINX_WORK_DIR/objs "$CARGO" build --release --no-default-features \
    --manifest-path "$ROOT/Cargo.toml" ||
    die "cargo build failed"

SO_SRC=$CARGO_TARGET_DIR/release/libngx_stream_upsync_module.so
SO_DST=$CARGO_TARGET_DIR/ngx_stream_upsync_module.so
[ -f "$SO_SRC" ] || die "cargo did not produce $SO_SRC"
cp -f "$SO_SRC" "$SO_DST.tmp"
mv -f "$SO_DST.tmp" "$SO_DST"

printf '%s\n' "$SO_DST"
