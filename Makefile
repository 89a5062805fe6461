# eoss: `make test` is the CI command (.ci/run); `make quickstart` runs the quickstart pipeline;
# `make figNN` (or `make figN`) reproduces figure NN into figures/figNN.{png,svg,csv}.
CARGO ?= cargo
PROFILE ?= smoke
DEVICE ?= cpu
JOBS ?= 2
EOSS_DATA ?= $(CURDIR)/../shared/data
export EOSS_DATA

FEATURES := $(if $(filter cuda,$(DEVICE)),--features cuda,)
EOSS := $(CARGO) run --release $(FEATURES) --
FIGURES := $(patsubst pipelines/%.yaml,%,$(wildcard pipelines/fig*.yaml))

.PHONY: test lint check-figures quickstart bench figures $(FIGURES)

# fmt, clippy, every test, and the minutes-long checks that the smoke figures 1, 2 and 8 show their
# effect (tests/figures.rs; about 24 minutes in all on 2 cores, with the build); `cargo test` alone skips those.
test: lint
	$(CARGO) test
	$(MAKE) check-figures

# The figure checks alone.
check-figures:
	$(CARGO) test --test figures -- --ignored --test-threads 1

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

quickstart:
	$(EOSS) run pipelines/quickstart.yaml --jobs $(JOBS) --export figures

# The engine's criterion bench, then SGD steps and curvature (next to PyTorch with TORCH=python-with-torch).
TORCH ?=
bench:
	$(CARGO) bench --bench engine
	$(EOSS) bench --device $(DEVICE) $(if $(TORCH),--torch $(TORCH))

# Every figure; one that cannot run (the SVHN ones without the SVHN files) does not stop the rest,
# and make still exits non-zero, naming it.
figures:
	$(MAKE) -k $(FIGURES)

$(FIGURES): fig%:
	$(EOSS) run pipelines/fig$*.yaml --profile $(PROFILE) --jobs $(JOBS) --export figures \
	  $(if $(filter cuda,$(DEVICE)),$(if $(shell grep -lE '^  train[-_a-z0-9]*:' pipelines/fig$*.yaml),--set 'train*.device=cuda'))

# `make fig1` is `make fig01`.
fig1 fig2 fig3 fig4 fig5 fig6 fig7 fig8 fig9: fig%: fig0%
