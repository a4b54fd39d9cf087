# sqlite-writelock — `make demo` and `make test` are the two commands.
CARGO ?= cargo
SO := target/release/libwritelock.so

.PHONY: all build demo test unit e2e lint clean torture

all: build

build: $(SO)

# Always ask cargo: it knows when sources changed.
$(SO): FORCE
	$(CARGO) build --release -p sqlite-writelock
FORCE:

demo: build
	bash scripts/demo.sh

# The whole suite: unit tests (protocol, lock file), SQL scripts (sql/*.slt)
# with and without the extension, and real-process lock tests.
test: build unit e2e

unit:
	$(CARGO) test --lib

e2e: build
	$(CARGO) test --release -p writelock-tests

# The torture suite at length: 60 s per round (each journal mode, with and
# without the extension), plus the SIGKILL crash test with 100 kills per mode.
torture: build
	TORTURE_SECS=60 TORTURE_KILLS=100 $(CARGO) test --release -p writelock-tests --test torture -- --nocapture --test-threads=1

# Formatting and clippy, as CI runs them.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --lib -- -D warnings
	$(CARGO) clippy --release -p writelock-tests --tests -- -D warnings

clean:
	$(CARGO) clean

# ---- clients (issue 4) ----------------------------------------------------------
.PHONY: examples clients lint-examples

# The Rust programs in examples/ (register() linked into a bundled SQLite, and
# load_extension): their own cargo invocation, never together with the root
# cdylib, whose libsqlite3-sys `loadable_extension` feature would be unified in.
examples:
	$(CARGO) build --release -p writelock-examples

# Every client on its own and all at once: the sqlite3 shell, Python (Debian's
# python3 and the one on PATH, each in a venv under target/clients/ with
# `pip install ./bindings/python`), the Rust examples, Node (better-sqlite3 12,
# npm-installed into bindings/node). Part of `make e2e`/`make test`; this runs
# it alone.
clients: build examples
	$(CARGO) test --release -p writelock-tests --test clients

e2e: examples

lint: lint-examples
lint-examples:
	$(CARGO) clippy --release -p writelock-examples -- -D warnings

# ---- benchmark (issue 7) --------------------------------------------------------
.PHONY: bench

# Stock SQLite, the application-level flock and the extension side by side, with
# real processes: single-writer overhead and a multi-writer task queue (WAL and
# DELETE). Prints a table; writes target/bench/results.{md,json} and
# target/bench/writer-wait-cdf.svg. BENCH_SECS, BENCH_PROCS, BENCH_REPEAT, … :
# see bench/src/main.rs. Its own cargo invocation (bundled SQLite, no unification
# with the cdylib's loadable_extension).
bench: build
	$(CARGO) run --release -p writelock-bench
