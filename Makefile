# Kubeforge — developer entry points. Everything runs from the project's virtual environment (.venv),
# created by hack/python-env.sh; the local control plane is built and run by hack/.
SHELL := /bin/bash
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: help install lint test test-unit test-integration test-e2e cluster cluster-down crds demo mlflow mlflow-down images clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

.venv/.ready: pyproject.toml hack/python-env.sh
	@bash hack/python-env.sh >/dev/null
	@touch $@

install: .venv/.ready ## create the virtual environment (cached in ~/.cache/kubeforge)

lint: install ## ruff, mypy (strict) and the import-linter layer contracts
	ruff check .
	mypy crds controllers model_registry runtime operator/main.py
	lint-imports

test: lint ## every test: unit, integration (real local control plane, MLflow) and e2e
	# the training runtime's tests fork workers from the pytest process: they run in a process of their own,
	# before anything (the serving tests' torch.compile) leaves state behind that a forked child deadlocks on
	$(PY) -m pytest tests/integration/training
	$(PY) -m pytest tests --ignore=tests/integration/training

test-unit: install ## unit tests only (no cluster)
	$(PY) -m pytest tests/unit

test-integration: install ## integration and e2e tests
	$(PY) -m pytest tests/integration/training
	$(PY) -m pytest tests/integration tests/e2e --ignore=tests/integration/training

cluster: ## start (or reuse) the local control plane and print the KUBECONFIG line
	@bash hack/cluster.sh up

cluster-down: ## stop the local control plane and remove its state
	@bash hack/cluster.sh down

crds: install ## regenerate the CRD manifests, the chart's copy and docs/api.md
	$(PY) -m crds.generate

demo: install ## run the main job on the local defaults
	@bash hack/demo.sh

mlflow: install ## start (or reuse) a local MLflow server (sqlite) and print its URI
	@bash hack/mlflow.sh start

mlflow-down: ## stop the local MLflow server
	@bash hack/mlflow.sh stop

IMAGE_REGISTRY ?= ghcr.io/kubeforge
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker
images: ## build the operator and runtime images (DOCKER=docker or podman, IMAGE_REGISTRY, IMAGE_TAG)
	@command -v $(DOCKER) >/dev/null || { echo "make images needs $(DOCKER) (or DOCKER=podman)"; exit 1; }
	$(DOCKER) build --target operator -t $(IMAGE_REGISTRY)/operator:$(IMAGE_TAG) .
	$(DOCKER) build --target runtime -t $(IMAGE_REGISTRY)/runtime:$(IMAGE_TAG) .

clean: ## remove local state (not the caches)
	rm -rf .state .pytest_cache .mypy_cache .ruff_cache
