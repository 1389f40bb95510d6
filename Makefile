# `make demo` and `make test` do all set-up themselves; both are safe to run again.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: demo test lint bench clean system

# Debian packages the tests run for real: the Mosquitto broker, qemu-user (aarch64 runtime tests),
# PostgreSQL (fleet storage tests), chromium (dashboard tests) and prometheus (promtool checks /metrics).
# Installed when root (CI, fresh machines); otherwise they must be there.
DEBS := mosquitto mosquitto-clients qemu-user postgresql chromium prometheus
SYSTEM_STAMP := $(VENV)/.system-$(shell echo $(DEBS) | sha256sum | cut -c1-8)
$(SYSTEM_STAMP):
	@mkdir -p $(VENV)
	@missing=""; \
	command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || missing="$$missing mosquitto"; \
	command -v mosquitto_passwd >/dev/null || missing="$$missing mosquitto-clients"; \
	command -v qemu-aarch64 >/dev/null || missing="$$missing qemu-user"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else echo "missing Debian packages:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi
	@# The tests start their own broker and database on loopback ports; the Debian services are not needed.
	@-systemctl disable --now mosquitto postgresql >/dev/null 2>&1 || true
	touch $@

system: $(SYSTEM_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a plain 'torch' requirement would pull several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The end-to-end demo (examples/demo.py); DEMO_ARGS=--keep-running leaves the fleet up for browsing.
demo: $(STAMP) $(SYSTEM_STAMP)
	$(PY) -m examples.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy sdk runtime converters fleet

test: $(STAMP) $(SYSTEM_STAMP) lint
	# The aarch64 Python under qemu (cached in .cache/aarch64; downloads arm64 debs and aarch64 wheels once)
	PYTHON=$(PY) bash tools/aarch64-env.sh
	# ONNX Runtime's OpenVINO build beside (not instead of) the normal one: it replaces the onnxruntime
	# module, so it lives in its own directory and the accelerator tests put it first on PYTHONPATH.
	test -d .cache/openvino/onnxruntime || $(PY) -m pip install -q --no-deps --target .cache/openvino onnxruntime-openvino==1.24.1
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP) $(SYSTEM_STAMP)
	PYTHON=$(PY) benchmarks/run_all

clean:
	rm -rf build test-artifacts .pytest_cache .mypy_cache .ruff_cache
