# One entry point for developers. CI runs `scripts/test`, which runs `make check` first.
#
#   make check      rustfmt --check, clippy on every target with warnings as errors,
#                   the unit tests (core) -- run before every commit
#   make build      the module (debug) and the vendored nginx 1.28 it is tested with
#   make release    the same, optimized
#   make test       the whole suite: check, builds, packages, nginx-tests (scripts/test)
#   make prove T=nginx-tests/upsync_reload.t   some test files against the debug build
#   make sanitize   nginx-tests under valgrind memcheck (scripts/valgrind), reporting
#                   memory errors whose stack goes through the module
#   make fuzz       every fuzz target for 30 s (scripts/fuzz)
#   make bench      the benchmark tables (scripts/bench/run, scripts/bench/select)

CARGO ?= cargo
T ?= nginx-tests/*.t

.PHONY: check fmt clippy unit build release test prove sanitize fuzz bench

check: fmt clippy unit

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings

unit:
	$(CARGO) test --workspace --quiet

build:
	$(CARGO) build

release:
	$(CARGO) build --release

test:
	scripts/test

prove: build
	TEST_NGINX_BINARY="$$(ls -t $(CURDIR)/target/debug/build/nginx-sys-*/out/objs/nginx | sed -n 1p)" \
	TEST_NGINX_MODULE="$(CURDIR)/target/debug/libngx_stream_upsync_module.so" \
	prove -j2 $(T)

sanitize:
	scripts/valgrind $(filter-out nginx-tests/*.t,$(T))

fuzz:
	scripts/fuzz

bench:
	scripts/bench/run
	scripts/bench/select
