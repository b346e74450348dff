# classifyd: the two commands are `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
HTTP_PORT ?=
PROTOS := protos/classifier/v1/classifier.proto
STUBS := classifier/v1/classifier_pb2.py classifier/v1/classifier_pb2.pyi classifier/v1/classifier_pb2_grpc.py

.PHONY: setup serve test proto proto-check default-model lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

serve: setup
	$(PY) -m server --models-dir models --host $(HOST) --port $(PORT) $(if $(HTTP_PORT),--http-port $(HTTP_PORT))

test: setup proto-check
	$(PY) -m pytest

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

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
