# `make demo` runs the main job, `make test` the whole test suite; both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# deepspeed is an sdist whose setup imports torch: build it against the torch above.
	$(PY) -m pip install -q --no-build-isolation -e '.[test,app]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unirestorer demo

test: $(STAMP)
	$(PY) -m pytest
