# Two commands on a fresh machine: `make demo` and `make test`. Both create the virtualenv and
# install what is missing (torch 2.14.1 + torchvision 0.29.1 from this machine's disk, the
# Fashion-MNIST Debian package when run as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
OUT ?= runs/demo
export NNOC_THREADS ?= $(shell nproc)

.PHONY: setup data redis tools docs-screenshots demo demo-predeploy test test-fast lint results-attacks results-predeploy \
	results-repair results-sequential results-repair-lr results-cyclegan-speed results-serving results-predeploy-speed results-cell-cost results-cost results-table5 results-averaging \
	results clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

data:
	@if [ ! -e $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; \
	fi

redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)); \
	  else echo "redis-server missing: run 'sudo apt-get install redis-server'"; exit 1; fi; }

# The main job: the online scenario (API + worker + Redis as real processes, a poisoned stream
# over HTTP, the repair at N = 200 and the swap under traffic); writes docs/results/demo.{json,md}.
demo: setup data redis
	$(PY) -m nnoculation.benchmarks.online_demo --out docs/results

# The offline pre-deployment defense alone: a patch BadNet, the grid search, the report.
demo-predeploy: setup data
	$(VENV)/bin/nnoculation attack --dataset fashion-mnist --attack patch --out $(OUT)
	$(VENV)/bin/nnoculation predeploy --badnet $(OUT) --evaluate-attack --out $(OUT)/predeploy

# Debian tools the operations tests run for real: promtool (prometheus), chromium + chromedriver.
tools:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)); \
	  else echo "missing Debian packages:$$missing (run 'sudo apt-get install$$missing')"; exit 1; fi; \
	fi

test: setup data redis tools
	$(PY) -m pytest

# Refresh docs/images/dashboard.png (docs/operations.md) from the dashboard's browser test.
docs-screenshots: setup tools
	NNOC_SCREENSHOT_DIR=docs/images $(PY) -m pytest -q tests/test_dashboard_browser.py

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy models nnoculation service worker

# Benchmarks: every figure in docs/results/ comes from one of these.
results-attacks: setup data
	$(PY) -m nnoculation.benchmarks.attacks --out docs/results

results-predeploy: setup data
	$(PY) -m nnoculation.benchmarks.predeploy --out docs/results

# Needs the BadNets of results-attacks and the deployments of results-predeploy (made when missing).
results-repair: setup data
	$(PY) -m nnoculation.benchmarks.repair --out docs/results

results-sequential: setup data
	$(PY) -m nnoculation.benchmarks.repair --sequential --out docs/results

# The fine-tune learning rate's CA / ASR trade-off on the attacks the default repair misses.
results-repair-lr: setup data
	$(PY) -m nnoculation.benchmarks.repair_lr --out docs/results

# Pre-deployment search time, old vs new, with the whole grid's pick (issue 12); resumable per
# entry (--only NAME for one). ResNet-18 is listed but takes hours on 2 CPU cores.
results-predeploy-speed: setup data
	$(PY) -m nnoculation.benchmarks.predeploy_speed --out docs/results

# What one pre-deployment cell costs under each speed idea (fused Adam, threads, processes, batches).
results-cell-cost: setup data
	$(PY) -m nnoculation.benchmarks.cell_cost --out docs/results

# Evaluation matrices of `nnoculation bench` (docs/bench.md): Table 5 whole (hours), or one
# attack's row from configs/table5-ATTACK.toml (`make results-table5-fsa`, ...).
results-table5: setup data
	$(VENV)/bin/nnoculation bench configs/table5.toml --out docs/results

results-table5-%: setup data
	$(VENV)/bin/nnoculation bench configs/table5-$*.toml --out docs/results

results-averaging: setup data
	$(VENV)/bin/nnoculation bench configs/averaging.toml --out docs/results

# Inference ms per input of the ensemble vs STRIP, and each defense's offline seconds (issue 10).
results-cost: setup data
	$(PY) -m nnoculation.benchmarks.cost --out docs/results

results-cyclegan-speed: setup
	$(PY) -m nnoculation.benchmarks.cyclegan_speed --out docs/results

# Serving throughput / latency over HTTP, ours against LitServe, with wrk as load generator.
results-serving: setup data redis
	@command -v wrk >/dev/null || apt-get install -y -q wrk || (apt-get update -q && apt-get install -y -q wrk)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) -m nnoculation.benchmarks.serving --out docs/results

results: results-attacks results-predeploy results-repair results-sequential results-repair-lr \
	results-cyclegan-speed

clean:
	rm -rf runs .cache .pytest_cache
