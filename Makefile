# One-command entry points (see README): `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench-latency bench-topk bench-fleet bench-memory bench-quality bench-int8 bench-loss clean

$(BIN)/edgerec: setup.py pyproject.toml $(wildcard edgerec/*.py edge_runtime/*.py edge_runtime/*/*.py trainer/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -rf build  # a stale build/lib would ship modules that moved since
	$(BIN)/python -m pip install --quiet '.[trainer,test]'
	touch $@

install: $(BIN)/edgerec

demo: install
	$(BIN)/edgerec demo

test: install
	$(BIN)/pytest -q tests

BENCH_BUNDLE ?= bench/results/beauty-bundle

$(BENCH_BUNDLE)/manifest.json: | install
	$(BIN)/edgerec train --out $(BENCH_BUNDLE) --quiet

bench-latency: install $(BENCH_BUNDLE)/manifest.json
	$(BIN)/python bench/bench_latency.py --bundle $(BENCH_BUNDLE)

bench-fleet: install $(BENCH_BUNDLE)/manifest.json
	$(BIN)/python bench/bench_fleet.py --bundle $(BENCH_BUNDLE)

bench-memory: install
	$(BIN)/python bench/bench_memory.py

bench-quality: install
	$(BIN)/python bench/bench_quality.py

bench-int8: install $(BENCH_BUNDLE)/manifest.json
	$(BIN)/python bench/bench_int8.py --bundle $(BENCH_BUNDLE)

bench-loss: install
	$(BIN)/python bench/bench_loss.py

bench-topk: install
	$(BIN)/python -m pip install --quiet '.[bench]'
	$(BIN)/python bench/bench_topk.py

clean:
	rm -rf $(VENV) build *.egg-info edgerec-demo
