# classifyd: the two commands are `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
HTTP_PORT ?=
NPM ?= npm
NODE ?= node
NODE_CLIENT := client/node
PROTOS := protos/classifier/v1/classifier.proto protos/inference/grpc_service.proto
STUBS := classifier/v1/classifier_pb2.py classifier/v1/classifier_pb2.pyi classifier/v1/classifier_pb2_grpc.py \
	inference/grpc_service_pb2.py inference/grpc_service_pb2.pyi inference/grpc_service_pb2_grpc.py

.PHONY: setup serve test test-node proto proto-check default-model lint lint-deploy bench clean

setup: $(VENV)/.installed $(NODE_CLIENT)/node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The Node.js client's dependencies, exactly as client/node/package-lock.json pins them.
$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package-lock.json
	$(NPM) ci --prefix $(NODE_CLIENT)
	touch $@

serve: setup
	$(PY) -m server --models-dir models --host $(HOST) --port $(PORT) $(if $(HTTP_PORT),--http-port $(HTTP_PORT))

test: setup proto-check
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-node

# The Node.js client's tests, against a daemon they start with $(PY).
test-node: setup
	cd $(NODE_CLIENT) && CLASSIFYD_PYTHON=$(abspath $(PY)) $(NODE) --test test/

# Generated stubs are committed; never edit them by hand.
proto:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTOS)

# Fails when the committed stubs differ from what the .proto files generate.
proto-check:
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTOS) && \
	for f in $(STUBS); do \
	  cmp -s $$tmp/$$f protos/$$f || { echo "stale generated stub: protos/$$f (run 'make proto')"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated stubs are up to date"

default-model: setup
	$(PY) -m tools.train_digits --out models/digits

# Benchmarks are not tests: several minutes of full load (see docs/benchmarks.md).
bench: setup
	$(PY) -m benchmarks.cpu_bench
	$(PY) -m benchmarks.swap_bench

# ruff, then the layer rules of docs/architecture.md (import-linter contracts in pyproject.toml).
lint: setup lint-deploy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The Dockerfile (hadolint) and the Kubernetes manifests against the API schemas (offline).
lint-deploy: setup
	$(VENV)/bin/hadolint deploy/Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml deploy/k8s/object-storage/*.yaml

clean:
	rm -rf $(VENV) .pytest_cache $(NODE_CLIENT)/node_modules
