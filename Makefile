# rrome: every target does its own set-up on a fresh machine and is safe to run again.
#   make demo   build everything, then run the main job (see README)
#   make test   build everything, then run every check and test (what CI runs)
#   make bench  benchmarks (never part of make test)

SHELL := /bin/bash
PYTHON ?= python3
VENV := $(abspath .venv)
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.rrome-deps-v4
EXT_STAMP := $(VENV)/.rrome-ext
RUST_SRC := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup build demo demo-offline test lint test-rust test-python check-wheel bench bench-rust clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.7,<2" "numpy>=1.26" "click>=8.1" "tqdm>=4.66" "safetensors>=0.4" \
		"torch>=2.2" "transformers>=4.45" "matplotlib>=3.7" accelerate gguf "peft>=0.13" "pytest>=8" "ruff>=0.6" "mypy>=1.11"
	touch $@

setup: $(DEPS_STAMP)

# The release build of the extension, installed editable into the venv. maturin develop runs
# pip install on the package's dependencies without -q; $(DEPS_STAMP) installed them already, so
# pip's "Requirement already satisfied" lines (about 70) are dropped. (PIP_QUIET would also
# silence the `pip show` whose output maturin reads to mark the install editable.)
$(EXT_STAMP): $(DEPS_STAMP) $(RUST_SRC)
	set -o pipefail; VIRTUAL_ENV=$(VENV) PATH=$(VENV)/bin:$$PATH $(VENV)/bin/maturin develop --release -q 2>&1 \
		| { grep -v '^Requirement already satisfied: ' || true; }
	touch $@

build: $(EXT_STAMP)

demo: build
	$(PY) examples/demo.py

demo-offline: build
	$(PY) examples/offline_delta_demo.py --workdir demo-out/offline

lint: $(DEPS_STAMP)
	cargo fmt --all --check
	cargo clippy --workspace --release --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches examples scripts
	$(VENV)/bin/ruff format --check python tests benches examples scripts

test-rust:
	cargo test --release -p rrome-core

test-python: build
	$(PY) -m mypy
	$(PY) -m mypy.stubtest rrome._rust --allowlist .ci/stubtest-allowlist.txt
	$(PY) -m pytest -q

check-wheel: $(DEPS_STAMP)
	bash .ci/check-wheel.sh $(PY)

test: build lint test-rust test-python check-wheel

# Criterion benches of the Rust kernels, summarised (bench-results-rust.json), then the Python
# driver's side-by-side comparisons (bench-results.json). BENCH_ARGS=--quick for a smoke run.
bench: build bench-rust
	$(PY) benches/run.py $(BENCH_ARGS)

bench-rust: $(DEPS_STAMP)
	mkdir -p target && cargo bench -p rrome-core --bench kernels > target/bench-rust.log 2>&1 || { tail -30 target/bench-rust.log; exit 1; }
	$(PY) benches/criterion_summary.py

clean:
	rm -rf target dist demo-out $(EXT_STAMP)
