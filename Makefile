# Capsule networks at cluster scale. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch build to install first. The pins are the wheels this project is tested with (they
# install offline on our machines); elsewhere e.g. `make install TORCH_PKGS="torch torchvision"`.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# CONFIG / TUNE_CONFIG default per target: local configs for train/tune, object-storage ones
# (absolute paths) for the cluster targets.
CONFIG ?=
TUNE_CONFIG ?=
DATASET ?= auto
DATA_DIR ?=
CLOUD ?= aws
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install test test-fast lint format bench smoke train tune eval clean \
	train-cluster tune-cluster cluster-up cluster-down

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_PKGS)
	$(PIP) install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its dev tools

test: install  ## all test tiers this machine can run (unit, slow, ray; gpu when CUDA exists)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install  ## the fast tier only (about a minute: unit tests; no Ray, no S3 server, no DDP)
	$(PY) -m pytest -m "not slow and not ray" $(PYTEST_ARGS)

lint: install  ## check style, lint and types over the whole tree (changes nothing)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy capscore

format: install  ## fix what ruff can fix, format the whole tree
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install  ## model train-step and data-loader benchmarks (see BENCHMARKS.md)
	$(PY) bench/bench_model.py
	$(PY) bench/bench_loader.py

smoke: install  ## the main job, small: shards -> Ray TorchTrainer (1 worker) -> eval -> accuracy check
	$(VENV)/bin/capsnet smoke --dataset $(DATASET) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

train: install  ## train CONFIG here: run.num_workers=auto = every local GPU, else one CPU worker (RAY_ADDRESS: a cluster)
	$(VENV)/bin/capsnet train --config $(or $(CONFIG),configs/mnist.yaml) $(ARGS)

tune: install  ## Ray Tune search TUNE_CONFIG on this machine (or RAY_ADDRESS)
	$(VENV)/bin/capsnet tune --config $(or $(TUNE_CONFIG),configs/tune-mnist.yaml) $(ARGS)

train-cluster: install  ## submit `capsnet train --config CONFIG` as a Ray Job to RAY_ADDRESS, follow it
	$(VENV)/bin/capsnet submit train --config $(or $(CONFIG),configs/cluster/mnist-16gpu.yaml) $(ARGS)

tune-cluster: install  ## submit `capsnet tune --config TUNE_CONFIG` as a Ray Job to RAY_ADDRESS
	$(VENV)/bin/capsnet submit tune --config $(or $(TUNE_CONFIG),configs/cluster/tune-mnist-16gpu.yaml) $(ARGS)

cluster-up: install  ## start a Ray cluster with the launcher: CLOUD=aws|gcp
	$(VENV)/bin/ray up -y cluster/$(CLOUD).yaml

cluster-down: install  ## tear the launcher cluster down: CLOUD=aws|gcp
	$(VENV)/bin/ray down -y cluster/$(CLOUD).yaml

clean:  ## remove the venv and local outputs
	rm -rf $(VENV) runs shards .pytest_cache
