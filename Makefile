# `make demo` runs the main job, `make test` the whole test suite; both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

# uv installs the same packages as pip, about 2x faster (50 s vs 109 s, BENCHMARKS.md "Where the demo's time
# goes, and the venv"); it reads UV_DEFAULT_INDEX / UV_INDEX, not pip.conf, where a mirror is needed, and trusts the
# system's certificates (as pip does), so a TLS-inspecting proxy's CA works without SSL_CERT_FILE. Like pip
# it compiles the bytecode: without .pyc files every process imports torch from source, and the test suite,
# which starts hundreds of them, took 1310 s instead of 749 s.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	$(UV) pip install -q --system-certs --compile-bytecode --python $(PY) 'setuptools>=69' wheel torch==2.14.1 torchvision==0.29.1
	# deepspeed is an sdist whose setup imports torch: build it against the torch above.
	$(UV) pip install -q --system-certs --compile-bytecode --python $(PY) --no-build-isolation -e '.[test,app]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unirestorer demo

test: $(STAMP)
	$(PY) -m pytest
