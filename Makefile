# diffmesh — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STUBS := libs/diffmesh/src/diffmesh/v1
PROTOS := $(wildcard proto/diffmesh/v1/*.proto)
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z][a-z0-9-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): libs/diffmesh/pyproject.toml services/*/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a CPU build from local disk; a bare `torch` would pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q -e 'libs/diffmesh[demo,sim]' -e services/cache-coordinator -e services/router \
		-e services/instance-manager -e services/worker
	touch $(STAMP)

venv: $(STAMP) ## create .venv and install every package (editable) with dev tools

$(STUBS)/.stamp: $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=libs/diffmesh/src --grpc_python_out=libs/diffmesh/src \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=libs/diffmesh/src \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=libs/diffmesh/src $(PROTOS)
	touch $@

proto: $(STUBS)/.stamp ## generate Python stubs from proto/ (gitignored)

run: proto ## run the whole mesh locally, send demo requests, write PNGs to out/demo
	$(VENV)/bin/diffmesh run --out out/demo

COMPOSE_SCHEMA := .cache/compose_spec.json
$(COMPOSE_SCHEMA): | $(STAMP)
	# The compose-spec JSON schema as shipped inside the docker-compose 1.29.2 wheel (PyPI).
	mkdir -p .cache/wheels
	$(PIP) download -q --no-deps docker-compose==1.29.2 -d .cache/wheels
	$(PY) -c "import glob, zipfile; w = glob.glob('.cache/wheels/docker_compose-1.29.2-*.whl')[0]; \
		open('$@', 'wb').write(zipfile.ZipFile(w).read('compose/config/compose_spec.json'))"

compose-schema: $(COMPOSE_SCHEMA) ## fetch the compose-spec schema used by the static compose test

CONFIG_DOCS := README.md $(wildcard services/*/README.md)
config-doc: proto ## regenerate the READMEs' configuration tables from the settings classes
	$(VENV)/bin/diffmesh config --update $(CONFIG_DOCS)

test: proto $(COMPOSE_SCHEMA) ## run the test suite (unit, contract, e2e, static)
	$(PY) -m pytest -q -rs tests

lint: proto ## ruff and mypy on our own packages
	$(VENV)/bin/ruff check libs services tests bench
	$(VENV)/bin/mypy -p diffmesh -p diffmesh_router -p diffmesh_coordinator -p diffmesh_instance_manager -p diffmesh_worker

sim: proto ## trace-driven simulator on ../shared/traces/alibaba-genai-2026 (see README)
	$(VENV)/bin/diffmesh sim --trace $${DIFFMESH_TRACE:-../shared/traces/alibaba-genai-2026} --json out/sim.json --plot out/sim.png

replay: proto ## live trace replay: lru vs diffmesh on fresh local meshes (see libs/diffmesh/src/diffmesh/replay/README.md)
	$(VENV)/bin/diffmesh replay --trace $${DIFFMESH_TRACE:-../shared/traces/alibaba-genai-2026} --policy all \
		--json out/replay.json --plot out/replay.png

bench-load: proto ## loading benchmark on a generated SD1.5-size UNet (see bench/README.md)
	$(PY) bench/load_bench.py --json out/bench-load.json

bench-scale-out: proto ## scale-out benchmark: a new worker on a node with the pipeline in HOST vs REMOTE (see bench/README.md)
	$(PY) bench/scale_out_bench.py --json out/bench-scale-out.json

clean: ## remove generated stubs and local outputs
	rm -f $(STUBS)/*_pb2*.py $(STUBS)/*_pb2*.pyi $(STUBS)/.stamp
	rm -rf out .diffmesh

.PHONY: help venv proto compose-schema config-doc run test lint sim replay bench-load bench-scale-out clean
