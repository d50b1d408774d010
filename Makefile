# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install serve test test-extras test-compat lint models protos bench clean prometheus

install: $(STAMP)

# Reinstall whenever the package metadata changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: install
	$(BIN)/servekit serve $(ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# The tests marked `extras`: TensorFlow, PyTorch and the MiniLM text model, in an environment of
# their own with the heavy extras installed (about 3 GB); not part of `make test`.
EXTRAS := .venv-extras
$(EXTRAS)/.installed: pyproject.toml
	$(PYTHON) -m venv $(EXTRAS)
	$(EXTRAS)/bin/python -m pip install --quiet --upgrade pip
	$(EXTRAS)/bin/python -m pip install --quiet -e '.[test-extras]'
	touch $@

test-extras: $(EXTRAS)/.installed
	$(EXTRAS)/bin/pytest -m extras

# TF Serving's official client (tensorflow-serving-api, which pulls in tensorflow) against
# servekit's gRPC API, from an environment of its own; not part of `make test`.
COMPAT := .venv-compat
test-compat: install
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install --quiet tensorflow-serving-api pytest pytest-timeout
	SERVEKIT_PYTHON=$(BIN)/python $(COMPAT)/bin/pytest --noconftest -p no:cacheprovider \
		-o addopts= tests/compat

# Regenerate the Python code of the .proto files (needs the dev extra's grpcio-tools).
protos: install
	$(BIN)/python -m grpc_tools.protoc -Isrc \
		-I$$($(BIN)/python -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')/_proto \
		--python_out=src --pyi_out=src src/servekit/config/protos/*.proto \
		src/servekit/protocols/protos/*.proto
	# The API messages go into servekit's own descriptor pool (see protocols/protos/__init__.py).
	sed -i 's/^DESCRIPTOR = _descriptor_pool.Default()/from servekit.protocols.protos import POOL\nDESCRIPTOR = POOL/' \
		src/servekit/protocols/protos/*_pb2.py

# Prometheus and promtool for tests/observability/test_prometheus.py, from Debian's package,
# unpacked into .tools/prometheus/usr/bin without installing it, so no service starts.
PROMETHEUS_DIR := .tools/prometheus
prometheus: $(PROMETHEUS_DIR)/usr/bin/promtool

$(PROMETHEUS_DIR)/usr/bin/promtool:
	rm -rf $(PROMETHEUS_DIR).download && mkdir -p $(PROMETHEUS_DIR).download
	cd $(PROMETHEUS_DIR).download && \
		{ apt-get download prometheus || { apt-get update && apt-get download prometheus; }; }
	dpkg-deb -x $(PROMETHEUS_DIR).download/prometheus_*.deb $(PROMETHEUS_DIR)
	rm -rf $(PROMETHEUS_DIR).download
	test -x $@ && touch $@

# Rebuild the example ONNX models from scikit-learn's bundled digits data.
models: install
	$(BIN)/python -m servekit.examples.build

clean:
	rm -rf $(VENV) $(COMPAT) $(EXTRAS) .tools .mypy_cache .ruff_cache .pytest_cache

# Throughput against baselines and across protocols (needs wrk and h2load:
# apt-get install wrk nghttp2-client); see docs/benchmarks.md.
bench: install
	$(BIN)/python benchmarks/run_throughput.py
	$(BIN)/python benchmarks/run_protocols.py
