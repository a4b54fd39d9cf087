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
	$(CARGO) clippy --release -p sqlite-writelock --all-targets -- -D warnings
	$(CARGO) clippy --release -p writelock-tests --tests -- -D warnings

clean:
	$(CARGO) clean
