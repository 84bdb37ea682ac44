# cetvm — build, test and demo entry points.  Everything installs itself into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv native guests test demo bench clean

all: venv native guests

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The native CET block hook (C, system gcc); cetvm falls back to the Python layer without it.
native: venv
	$(PY) -m cetvm.cpu.native.build --quiet

guests:
	$(MAKE) -C guests

test: venv native guests
	$(PY) -m pytest -q

demo: venv native guests
	$(VENV)/bin/cetvm demo

bench: venv native guests
	$(VENV)/bin/cetvm bench

clean:
	rm -rf $(VENV) guests/build build src/*.egg-info src/cetvm/cpu/native/*.so src/cetvm/cpu/native/*.stamp .pytest_cache
