# nginx addon make fragment for ngx_stream_upsync_module: sourced by nginx's
# auto/make (from the nginx source root) after the main part of objs/Makefile
# is written.  Adds a rule that builds the Rust cdylib with cargo against this
# configured tree and copies it to objs/ngx_stream_upsync_module.so, and hooks
# it into `make modules` (hence `make` / `make build`) and `make install`.

ngx_upsync_dir=`cd "$ngx_addon_dir" && pwd`
ngx_upsync_srcroot=`pwd`

case "$NGX_OBJS" in
    /*) ngx_upsync_objs=$NGX_OBJS ;;
    *)  ngx_upsync_objs=$ngx_upsync_srcroot/$NGX_OBJS ;;
esac

ngx_upsync_so=$NGX_OBJS/ngx_stream_upsync_module$ngx_modext
ngx_upsync_lib=libngx_stream_upsync_module.so

# where `make install` puts it (same computation as auto/install)
case ".$NGX_MODULES_PATH" in
    ./*) ngx_upsync_modpath=$NGX_MODULES_PATH ;;
    *)   ngx_upsync_modpath=$NGX_PREFIX/$NGX_MODULES_PATH ;;
esac

cat << END                                                    >> $NGX_MAKEFILE

# ngx_stream_upsync_module (Rust): cargo does its own dependency tracking, so
# the rule always runs and cargo decides what to rebuild.
# NGINX_SOURCE_DIR/NGINX_BUILD_DIR make nginx-sys generate its bindings (and
# the module signature) from this tree; --no-default-features turns off the
# crate's vendored nginx.

NGX_UPSYNC_CARGO = \$\${CARGO:-cargo}
NGX_UPSYNC_TARGET = \$\${CARGO_TARGET_DIR:-$ngx_upsync_objs/ngx_stream_upsync_module}

modules:	$ngx_upsync_so

.PHONY:	$ngx_upsync_so ngx_stream_upsync_module_install

$ngx_upsync_so:
	cd '$ngx_upsync_dir' \\
		&& t="\$(NGX_UPSYNC_TARGET)" \\
		&& NGINX_SOURCE_DIR='$ngx_upsync_srcroot' \\
		   NGINX_BUILD_DIR='$ngx_upsync_objs' \\
		   CARGO_TARGET_DIR="\$\$t" \\
		   \$(NGX_UPSYNC_CARGO) build --release --no-default-features \\
			--manifest-path '$ngx_upsync_dir/Cargo.toml' \\
		&& cp "\$\$t/release/$ngx_upsync_lib" '$ngx_upsync_objs/ngx_stream_upsync_module$ngx_modext.tmp' \\
		&& mv -f '$ngx_upsync_objs/ngx_stream_upsync_module$ngx_modext.tmp' '$ngx_upsync_objs/ngx_stream_upsync_module$ngx_modext'

install:	ngx_stream_upsync_module_install

ngx_stream_upsync_module_install:	$ngx_upsync_so
	test -d '\$(DESTDIR)$ngx_upsync_modpath' \\
		|| mkdir -p '\$(DESTDIR)$ngx_upsync_modpath'
	test ! -f '\$(DESTDIR)$ngx_upsync_modpath/ngx_stream_upsync_module$ngx_modext' \\
		|| mv '\$(DESTDIR)$ngx_upsync_modpath/ngx_stream_upsync_module$ngx_modext' \\
			'\$(DESTDIR)$ngx_upsync_modpath/ngx_stream_upsync_module$ngx_modext.old'
	cp '$ngx_upsync_so' '\$(DESTDIR)$ngx_upsync_modpath/ngx_stream_upsync_module$ngx_modext'

END
