# eoss: `make test` is the CI command (.ci/run); `make quickstart` runs the quickstart pipeline.
CARGO ?= cargo

.PHONY: test lint quickstart bench

test: lint
	$(CARGO) test

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

quickstart:
	$(CARGO) run --release -- run pipelines/quickstart.yaml

bench:
	$(CARGO) bench --bench engine
