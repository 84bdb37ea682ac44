# cetvm — build, test and demo entry points.  Everything installs itself into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv guests test demo bench clean

all: venv guests

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

guests:
	$(MAKE) -C guests

test: venv guests
	$(PY) -m pytest -q

demo: venv guests
	$(VENV)/bin/cetvm demo

bench: venv guests
	$(VENV)/bin/cetvm bench

clean:
	rm -rf $(VENV) guests/build build src/*.egg-info
