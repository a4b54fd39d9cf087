# sqlite-writelock — `make demo` and `make test` are the two commands.
#
#   make demo      build, then writers with and without the extension: under a flock(1)
#                  job, and beside the close() that drops SQLite's locks (under a minute)
#   make test      everything CI runs: unit, SQL scripts, processes, clients
#   make lint      rustfmt and clippy on every package
#   make torture   the torture and SIGKILL crash suites at length (not in CI)
#   make bench     stock SQLite vs application flock vs the extension (not in CI)
#   make dist      the wheel, the npm package and a plain tarball, in dist/
#   make test-dist install each of them without cargo and run the install docs (CI)
CARGO ?= cargo

.PHONY: all build demo test unit e2e examples clients lint torture bench dist test-dist clean FORCE

all: build

# The loaded library (target/release/libwritelock.so) and the CLI
# (target/release/writelock). Always ask cargo: it knows when sources changed.
build: FORCE
	$(CARGO) build --release -p sqlite-writelock -p writelock-cli
FORCE:

# Part 2 of the demo runs the torture suite's worker (its own cargo invocation,
# as the tests: it links a bundled SQLite).
demo: build
	$(CARGO) build --release -p writelock-tests --bin torture_worker
	bash scripts/demo.sh

test: build unit e2e

# The protocol, the lock file, the page and waiting, without SQLite
# (writelock-core, including the model test), and the CLI's own tests.
unit:
	$(CARGO) test --release -p writelock-core -p writelock-cli

# Real processes and real clients against the built library: SQL scripts
# (sql/*.slt) with and without the extension, lock invariants, the CLI, the
# queue, filesystems, a short torture round, and every client (sqlite3 shell,
# Python, Rust, Node). Tests, examples and bench link a bundled SQLite, so
# each gets its own cargo invocation: cargo would otherwise unify the
# library's `loadable_extension` feature into them.
e2e: build examples
	$(CARGO) test --release -p writelock-tests

# Rust programs in examples/: register() linked into a bundled SQLite, and
# load_extension.
examples:
	$(CARGO) build --release -p writelock-examples

# The client tests alone.
clients: build examples
	$(CARGO) test --release -p writelock-tests --test clients

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release -p sqlite-writelock -p writelock-core -p writelock-cli --all-targets -- -D warnings
	$(CARGO) clippy --release -p writelock-tests --all-targets -- -D warnings
	$(CARGO) clippy --release -p writelock-examples -- -D warnings
	$(CARGO) clippy --release -p writelock-bench -- -D warnings

# 60 s per round (each journal mode, with and without the extension), plus
# the SIGKILL crash test with 100 kills per mode.
torture: build
	TORTURE_SECS=60 TORTURE_KILLS=100 $(CARGO) test --release -p writelock-tests --test torture -- --nocapture --test-threads=1

# Real processes, modes interleaved; prints ratios against stock SQLite and
# the application-level flock measured in the same run, writes
# target/bench/results.{md,json} and a wait CDF. Options: docs/benchmark.md.
bench: build
	$(CARGO) run --release -p writelock-bench

# dist/: the Python wheel (library inside, `writelock` as a data script), the npm
# package and a plain tarball, all assembled from what `make build` built: no
# second cargo build, no network (scripts/dist.py; `npm pack` for the npm one).
PYTHON ?= python3
dist: build
	$(PYTHON) scripts/dist.py

# Install each artifact into fresh environments without cargo/rustc (two
# venvs, an npm project, a temporary HOME) and run the install docs' lines;
# the Rust lines against `cargo package` served as crates.io.
# Scratch in target/dist-test/; pip never leaves dist/. Needs the npm registry
# (better-sqlite3 may build with g++/make) and cargo's registry cache (offline).
test-dist: dist
	$(PYTHON) tests/dist.py

clean:
	$(CARGO) clean
	rm -rf dist
