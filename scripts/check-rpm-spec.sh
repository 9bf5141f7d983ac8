#!/usr/bin/env bash
# Check packaging/rpm/nginx-mod-stream-upsync.spec with the rpm tools, when
# they are installed (Debian: apt-get install rpm rpmlint); skips otherwise.
#
#   scripts/check-rpm-spec.sh           # parse every flavour, check the
#                                       # dependencies, rpmlint the spec
#   scripts/check-rpm-spec.sh --build   # also rpmbuild -bb the default flavour
#                                       # against THIS machine's Debian nginx
#                                       # (nginx-dev's tree standing in for
#                                       # Fedora's /usr/src/nginx-*), which runs
#                                       # configure, the signature check, cargo
#                                       # and %check (nginx -t loads the module)
#
# A real RPM for Fedora/RHEL or nginx.org needs their nginx: see
# packaging/rpm/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SPEC=packaging/rpm/nginx-mod-stream-upsync.spec
RPMLINTRC=packaging/rpm/nginx-mod-stream-upsync.rpmlintrc
BUILD=0
[ "${1:-}" = --build ] && BUILD=1

say() { printf 'check-rpm-spec: %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }

if ! command -v rpmspec >/dev/null 2>&1; then
    say "skipped: rpmspec not found (Debian: apt-get install rpm rpmlint)"
    exit 0
fi
[ -f "$SPEC" ] || fail "$SPEC not found"

# The spec's Version must follow Cargo.toml.
CRATE_VERSION=$(sed -n '/^\[package\]/,/^\[/{s/^version *= *"\([^"]*\)".*/\1/p}' Cargo.toml | sed -n 1p)
SPEC_VERSION=$(rpmspec -q --srpm --qf '%{VERSION}\n' "$SPEC" 2>/dev/null | sed -n 1p)
[ "$SPEC_VERSION" = "$CRATE_VERSION" ] ||
    fail "$SPEC has Version $SPEC_VERSION, Cargo.toml has $CRATE_VERSION"
say "Version $SPEC_VERSION matches Cargo.toml"

# Stand-ins for nginx-mod-devel's macros.nginxmods (absent on Debian).
FEDORA_DEFS=(--define '_nginx_abiversion 1.26.3' --define '_nginx_srcdir /usr/src/nginx-1.26.3-1.fc41'
             --define 'nginx_moddir /usr/lib64/nginx/modules' --define 'nginx_modconfdir /usr/share/nginx/modules')
ORG_DEFS=(--with nginxorg --define 'nginx_version 1.28.0')

parse() {
    local name=$1; shift
    rpmspec -P "$@" "$SPEC" >/dev/null 2>"${TMPDIR:-/tmp}/check-rpm-spec.$$" || {
        cat "${TMPDIR:-/tmp}/check-rpm-spec.$$" >&2; rm -f "${TMPDIR:-/tmp}/check-rpm-spec.$$"
        fail "rpmspec -P ($name) failed"
    }
    rm -f "${TMPDIR:-/tmp}/check-rpm-spec.$$"
    say "rpmspec -P ($name): ok"
}
parse "Fedora/RHEL, no nginx-mod-devel" 
parse "Fedora/RHEL" "${FEDORA_DEFS[@]}"
parse "Fedora/RHEL, vendored crates" "${FEDORA_DEFS[@]}" --with vendor
parse "nginx.org" "${ORG_DEFS[@]}"
parse "nginx.org, vendored crates" "${ORG_DEFS[@]}" --with vendor

requires() { rpmspec -q --requires "$@" "$SPEC" 2>/dev/null; }
requires "${FEDORA_DEFS[@]}" | grep -qx 'nginx(abi) = 1.26.3' || fail "Fedora flavour does not require nginx(abi) = 1.26.3"
requires "${FEDORA_DEFS[@]}" | grep -qx 'nginx-mod-stream' || fail "Fedora flavour does not require nginx-mod-stream"
requires "${ORG_DEFS[@]}" | grep -qx 'nginx-r1.28.0' || fail "nginx.org flavour does not require nginx-r1.28.0"
say "Requires: nginx(abi) = <abi> + nginx-mod-stream (Fedora/RHEL), nginx-r<version> (nginx.org)"

if command -v rpmlint >/dev/null 2>&1; then
    out=$(rpmlint -r "$RPMLINTRC" "$SPEC" 2>&1) || { printf '%s\n' "$out" >&2; fail "rpmlint reported errors"; }
    say "rpmlint: $(printf '%s\n' "$out" | grep -E 'specfiles? checked' | sed 's/^ *//')"
else
    say "rpmlint not installed; lint skipped (apt-get install rpmlint)"
fi

if [ "$BUILD" = 1 ]; then
    [ -d /usr/share/nginx/src ] && [ -x /usr/sbin/nginx ] ||
        fail "--build needs Debian's nginx, nginx-dev and libnginx-mod-stream"
    command -v rpmbuild >/dev/null 2>&1 || fail "--build needs rpmbuild (apt-get install rpm)"
    TOP=$(mktemp -d "${TMPDIR:-/tmp}/check-rpm-spec.XXXXXX")
    trap 'rm -rf "$TOP"' EXIT
    mkdir -p "$TOP/SOURCES"
    NV=nginx-mod-stream-upsync-$SPEC_VERSION
    # The working tree (not only committed files), without build output, test
    # scratch and the fuzz crate (not part of the module's build).  tar's
    # status 1 ("file changed as we read it": concurrent edits) is not fatal.
    b=$(basename "$ROOT")
    rc=0
    tar -C "$ROOT/.." --transform "s|^$b|$NV|" --exclude-vcs \
        --exclude="$b/target" --exclude="$b/fuzz" --exclude="$b/nginx-tests/tmp*" \
        --exclude="$b/scripts/bench/out" --warning=no-file-changed \
        -czf "$TOP/SOURCES/$NV.tar.gz" "$b" || rc=$?
    [ "$rc" -le 1 ] || fail "cannot make the source tarball (tar status $rc)"
    DEB_ABI=$(/usr/sbin/nginx -v 2>&1 | sed 's|.*/||')
    say "rpmbuild -bb against Debian's nginx $DEB_ABI (log: $TOP/build.log)"
    if ! rpmbuild -bb --nodeps --define "_topdir $TOP" --define 'debug_package %{nil}' \
            --define '_nginx_srcdir /usr/share/nginx/src' --define "_nginx_abiversion $DEB_ABI" \
            --define 'nginx_moddir /usr/lib/nginx/modules' --define 'nginx_modconfdir /usr/share/nginx/modules' \
            "$SPEC" >"$TOP/build.log" 2>&1; then
        tail -n 40 "$TOP/build.log" >&2
        trap - EXIT
        fail "rpmbuild failed (kept $TOP)"
    fi
    grep -q 'test is successful' "$TOP/build.log" || fail "%check did not run nginx -t successfully"
    RPM=$(ls "$TOP"/RPMS/*/*.rpm)
    rpm -qpl "$RPM" | grep -qx /usr/lib/nginx/modules/ngx_stream_upsync_module.so || fail "module missing from $RPM"
    rpm -qpl "$RPM" | grep -qx /usr/share/nginx/modules/zz-mod-stream-upsync.conf || fail "conf missing from $RPM"
    say "rpmbuild: $(basename "$RPM") built; signature matched; %check loaded the module into nginx -t"
fi

say "PASS"
