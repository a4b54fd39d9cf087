# sqlite-writelock — `make demo` and `make test` are the two commands.
CARGO ?= cargo
SO := target/release/libwritelock.so

.PHONY: all build demo test unit e2e lint clean

all: build

build: $(SO)

# Always ask cargo: it knows when sources changed.
$(SO): FORCE
	$(CARGO) build --release --lib
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

# Formatting and clippy, as CI runs them.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --lib -- -D warnings
	$(CARGO) clippy --release -p writelock-tests --tests -- -D warnings

clean:
	$(CARGO) clean
