#!/usr/bin/env bash
# Build a .deb of ngx_stream_upsync_module for Debian's packaged nginx.
#
#   scripts/package-deb.sh      # prints target/deb/libnginx-mod-stream-upsync_<ver>_<arch>.deb
#
# The module is built by scripts/build-debian-module.sh (ABI-matched to the
# installed nginx through nginx-dev's source tree), then laid out the way
# Debian's own libnginx-mod-* packages are (dh_nginx conventions):
#
#   /usr/lib/nginx/modules/ngx_stream_upsync_module.so
#   /usr/share/nginx/modules-available/mod-stream-upsync.conf   (load_module line)
#   /etc/nginx/modules-enabled/60-mod-stream-upsync.conf        (symlink made by postinst;
#        60 sorts after Debian's 50-mod-stream.conf, so the stream module is loaded first)
#   /usr/share/doc/libnginx-mod-stream-upsync/{copyright,changelog.Debian.gz,README.md.gz}
#
# Needs: nginx, nginx-dev, libnginx-mod-stream, dpkg-dev (dpkg-shlibdeps),
# binutils (strip), a Rust toolchain.  Runs lintian on the result when it is
# installed (LINTIAN=0 skips it).
#
# Environment (optional):
#   DEB_REVISION      Debian revision              (default 1)
#   DEBFULLNAME, DEBEMAIL  Maintainer              (default: git config user.name/email)
#   SOURCE_DATE_EPOCH changelog date and file mtimes (default: last git commit time)
#   DEB_OUT_DIR       output directory             (default target/deb)

set -euo pipefail

die() { printf 'package-deb: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'package-deb: %s\n' "$*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PKG=libnginx-mod-stream-upsync
MODULE_SO=ngx_stream_upsync_module.so
CONF_NAME=mod-stream-upsync.conf
# dh_nginx priority: Debian's stream module is 50-mod-stream.conf.
LINK_NAME=60-mod-stream-upsync.conf
ABI_SUBSTVARS=/usr/share/nginx/src/debian/libnginx-mod.abisubstvars
OUT_DIR=${DEB_OUT_DIR:-$ROOT/target/deb}

for tool in dpkg-deb dpkg-shlibdeps dpkg-query strip gzip; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install dpkg-dev binutils)"
done

# --- version and architecture -----------------------------------------------

CRATE_VERSION=$(sed -n '/^\[package\]/,/^\[/{s/^version *= *"\([^"]*\)".*/\1/p}' Cargo.toml | sed -n 1p)
[ -n "$CRATE_VERSION" ] || die "cannot read the version from Cargo.toml"
VERSION=$CRATE_VERSION-${DEB_REVISION:-1}
ARCH=$(dpkg --print-architecture)
DEB=$OUT_DIR/${PKG}_${VERSION}_${ARCH}.deb

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

MAINT_NAME=${DEBFULLNAME:-$(git -C "$ROOT" config user.name 2>/dev/null || true)}
MAINT_EMAIL=${DEBEMAIL:-$(git -C "$ROOT" config user.email 2>/dev/null || true)}
MAINTAINER="${MAINT_NAME:-ngx-stream-upsync maintainers} <${MAINT_EMAIL:-root@localhost}>"

# --- build the module ----------------------------------------------------------

note "building the module for Debian's nginx (scripts/build-debian-module.sh)"
SO=$("$ROOT/scripts/build-debian-module.sh" | tail -n1)
[ -f "$SO" ] || die "scripts/build-debian-module.sh did not produce the module (got '$SO')"

NGINX_PKG_VERSION=$(dpkg-query -W -f='${Version}' nginx 2>/dev/null || true)
STREAM_VERSION=$(dpkg-query -W -f='${Version}' libnginx-mod-stream 2>/dev/null || true)
[ -n "$STREAM_VERSION" ] || die "libnginx-mod-stream is not installed (apt-get install libnginx-mod-stream)"

# --- dependencies ----------------------------------------------------------------
# A dynamic module only loads into the nginx build whose module signature and
# struct layouts it was compiled against.  Debian expresses this with a
# virtual package: the nginx binary package Provides nginx-abi-<ver>-<n>
# (bookworm: nginx-abi-1.22.1-7) and every libnginx-mod-* Depends on it;
# nginx-dev records the value in $ABI_SUBSTVARS (dh_nginx reads it there).
# Debian bumps it whenever a patch or build change breaks module ABI, but not
# for ABI-neutral security uploads, so depending on it keeps this package
# installable across bookworm-security updates (1.22.1-9+deb12uN) while apt
# refuses an nginx it cannot load into.  Pinning
# `libnginx-mod-stream (= <exact version>)` would instead block every nginx
# security update until this package is rebuilt; it is only used as a
# fallback when no ABI provide exists (older or non-Debian nginx packaging).
# libnginx-mod-stream itself is required too: this module needs the stream
# module loaded first (it depends on the same ABI package, so any version of it
# that can be installed matches).
ABI=
if [ -r "$ABI_SUBSTVARS" ]; then
    ABI=$(sed -n 's/^nginx:abi=//p' "$ABI_SUBSTVARS" | sed -n 1p)
fi
if [ -n "$ABI" ] && dpkg-query -W -f='${Provides}\n' nginx nginx-core nginx-full nginx-light nginx-extras 2>/dev/null |
        tr ',' '\n' | sed 's/^ *//; s/ .*//' | grep -qxF "$ABI"; then
    NGINX_DEPENDS="$ABI, libnginx-mod-stream"
    note "depends on $ABI (the installed nginx provides it)"
else
    NGINX_DEPENDS="libnginx-mod-stream (= $STREAM_VERSION)"
    note "warning: the installed nginx provides no ${ABI:-nginx-abi-*} package;" \
         "pinning libnginx-mod-stream (= $STREAM_VERSION) instead"
fi

# --- stage the package tree ----------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/package-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# dpkg-shlibdeps wants debian/control and the files under debian/<package>.
STAGE=$WORK/debian/$PKG
DOC=$STAGE/usr/share/doc/$PKG
install -d -m 0755 "$STAGE/DEBIAN" "$STAGE/usr/lib/nginx/modules" \
    "$STAGE/usr/share/nginx/modules-available" "$DOC"

# The release profile keeps debug info (debug = 1); strip it as dh_strip does.
install -m 0644 "$SO" "$STAGE/usr/lib/nginx/modules/$MODULE_SO"
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$STAGE/usr/lib/nginx/modules/$MODULE_SO"

printf 'load_module modules/%s;\n' "$MODULE_SO" >"$STAGE/usr/share/nginx/modules-available/$CONF_NAME"
chmod 0644 "$STAGE/usr/share/nginx/modules-available/$CONF_NAME"

# --- documentation ------------------------------------------------------------------

YEAR=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
cat >"$DOC/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ngx-stream-upsync
Comment: The module statically links the Rust crates listed in Cargo.lock:
 ngx and nginx-sys (Apache-2.0; nginx-sys's bindings are generated from the
 nginx headers, BSD-2-Clause), zmij (MIT), memchr (Unlicense OR MIT) and
 serde, serde_json, libc, httparse, base64, thiserror, crc32fast and the rest
 (MIT OR Apache-2.0).

Files: *
Copyright: $YEAR ngx-stream-upsync contributors
License: BSD-2-Clause

License: BSD-2-Clause
 Redistribution and use in source and binary forms, with or without
 modification, are permitted provided that the following conditions
 are met:
 1. Redistributions of source code must retain the above copyright
    notice, this list of conditions and the following disclaimer.
 2. Redistributions in binary form must reproduce the above copyright
    notice, this list of conditions and the following disclaimer in the
    documentation and/or other materials provided with the distribution.
 .
 THIS SOFTWARE IS PROVIDED BY THE AUTHOR AND CONTRIBUTORS \`\`AS IS'' AND
 ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
 IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
 ARE DISCLAIMED.  IN NO EVENT SHALL THE AUTHOR OR CONTRIBUTORS BE LIABLE
 FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
 DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS
 OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION)
 HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT
 LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY
 OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF
 SUCH DAMAGE.
EOF

cat >"$WORK/changelog.Debian" <<EOF
$PKG ($VERSION) bookworm; urgency=medium

  * Package ngx_stream_upsync_module $CRATE_VERSION for Debian's nginx
    ${NGINX_PKG_VERSION:-(unknown version)} (built against nginx-dev with the
    configure arguments of the packaged binary).

 -- $MAINTAINER  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
gzip -9nc "$WORK/changelog.Debian" >"$DOC/changelog.Debian.gz"
# The whole README (directives, registry data formats, logs); compressed as
# dh_compress does for documentation over 4 kB.
gzip -9nc README.md >"$DOC/README.md.gz"
chmod 0644 "$DOC"/*

# Lintian: this is a local/third-party package, there is no ITP bug to close.
install -d -m 0755 "$STAGE/usr/share/lintian/overrides"
cat >"$STAGE/usr/share/lintian/overrides/$PKG" <<EOF
# Not uploaded to Debian: there is no ITP bug for the first changelog entry to close.
$PKG: initial-upload-closes-no-bugs
EOF
chmod 0644 "$STAGE/usr/share/lintian/overrides/$PKG"

# --- maintainer scripts (dh_nginx's autoscripts, for one module) --------------------
# As in Debian's libnginx-mod-*: the link is created on a fresh install, or on
# a reinstall after a package removal (the .removed marker), never re-created
# if the administrator deleted it; removal renames it to *.removed (which
# nginx.conf's modules-enabled/*.conf glob does not match, so the module is
# no longer loaded), purge deletes the link and the marker.  The nginx-reload
# trigger (nginx's postinst) reloads nginx only if it is running.

cat >"$STAGE/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e

from=$CONF_NAME
to=$LINK_NAME

case "\$1" in
configure|abort-remove|abort-deconfigure|abort-upgrade)
	if [ -L /etc/nginx/modules-enabled/\$to.removed ]; then
		rm /etc/nginx/modules-enabled/\$to.removed
		removed_link=true
	else
		removed_link=false
	fi

	# Link on a fresh installation, or on a reinstallation after a removal;
	# an administrator's own choice (a deleted link) is kept on upgrades.
	if [ -z "\$2" ] || [ "\$removed_link" = "true" ]; then
		mkdir -p /etc/nginx/modules-enabled
		ln -sf /usr/share/nginx/modules-available/\$from \\
			/etc/nginx/modules-enabled/\$to
	fi

	if command -v dpkg-trigger >/dev/null 2>&1 ; then
		dpkg-trigger --no-await nginx-reload
	fi
	;;
esac

exit 0
EOF

cat >"$STAGE/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e

to=$LINK_NAME

if [ "\$1" = "remove" ] || [ "\$1" = "deconfigure" ] ; then
	if [ -L /etc/nginx/modules-enabled/\$to ]; then
		mv /etc/nginx/modules-enabled/\$to /etc/nginx/modules-enabled/\$to.removed
	fi
fi

exit 0
EOF

cat >"$STAGE/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e

to=$LINK_NAME

if [ "\$1" = "remove" ] ; then
	if [ -L /etc/nginx/modules-enabled/\$to ]; then
		mv /etc/nginx/modules-enabled/\$to /etc/nginx/modules-enabled/\$to.removed
	fi
	if command -v dpkg-trigger >/dev/null 2>&1 ; then
		dpkg-trigger --no-await nginx-reload || true
	fi
fi

if [ "\$1" = "purge" ] ; then
	rm -f /etc/nginx/modules-enabled/\$to
	if [ -L /etc/nginx/modules-enabled/\$to.removed ]; then
		rm /etc/nginx/modules-enabled/\$to.removed
	fi
fi

exit 0
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

# --- control --------------------------------------------------------------------------

cat >"$WORK/debian/control" <<EOF
Source: ngx-stream-upsync

Package: $PKG
Architecture: any
EOF
SHLIBS=$(cd "$WORK" && dpkg-shlibdeps -O "debian/$PKG/usr/lib/nginx/modules/$MODULE_SO" |
         sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || die "dpkg-shlibdeps found no library dependencies"

# Installed-Size as dpkg-gencontrol computes it: KiB per file, rounded up.
INSTALLED_SIZE=$(find "$STAGE" -path "$STAGE/DEBIAN" -prune -o \( -type f -o -type l \) -printf '%s\n' |
                 awk '{ s += int(($1 + 1023) / 1024) } END { print s + 0 }')

cat >"$STAGE/DEBIAN/control" <<EOF
Package: $PKG
Source: ngx-stream-upsync
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_SIZE
Depends: $NGINX_DEPENDS, $SHLIBS
Section: httpd
Priority: optional
Description: dynamic stream upstreams from Consul and etcd for Nginx
 ngx_stream_upsync_module keeps the servers of nginx stream (TCP/UDP proxy)
 upstream blocks in sync with a service registry: Consul KV, Consul
 catalog/health, etcd v2 and etcd v3.  Changes apply without a reload and
 without dropping established connections; the last known set is dumped to a
 file that the upstream can include.  Directive-compatible with the C
 nginx-stream-upsync-module (upsync, upsync_dump_path, upsync_lb,
 upstream_show).
 .
 The module is enabled through /etc/nginx/modules-enabled and is loaded after
 the stream module (libnginx-mod-stream).
EOF

(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/md5sums"

# Reproducible mtimes (dpkg-deb also clamps to SOURCE_DATE_EPOCH).
find "$STAGE" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# --- build ------------------------------------------------------------------------------

mkdir -p "$OUT_DIR"
rm -f "$DEB.tmp"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB.tmp" >/dev/null
mv -f "$DEB.tmp" "$DEB"
note "built $DEB (Depends: $NGINX_DEPENDS, $SHLIBS)"

if [ "${LINTIAN:-1}" != 0 ] && command -v lintian >/dev/null 2>&1; then
    note "lintian:"
    # Report only: the package is usable even with remaining warnings.
    lintian --info "$DEB" >&2 2>&1 ||
        note "lintian reported errors (see above)"
elif [ "${LINTIAN:-1}" != 0 ]; then
    note "lintian not installed; skipping the lintian check (apt-get install lintian)"
fi

printf '%s\n' "$DEB"
