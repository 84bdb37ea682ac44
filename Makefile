# cetvm — build, test and demo entry points.  Everything installs itself into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv native guests debs test demo bench clean conformance linux-guest linux-guest-cache

all: venv native guests

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The native CET block hook (C, system gcc); cetvm falls back to the Python layer without it.
# Also the bytecode of the editable install, as pip compiles a wheel's at install: every
# `cetvm` start would otherwise compile ~25k lines first (0.25 s), with PYTHONDONTWRITEBYTECODE.
native: venv
	$(PY) -m cetvm.cpu.native.build --quiet
	$(PY) -m compileall -q src/cetvm >/dev/null

guests:
	$(MAKE) -C guests

# Debian packages the tests use: cpuid (real `cpuid -r` output, an oracle), acpica-tools
# (`iasl -d` disassembles the VMM's ACPI tables) and libc6-dev (glibc's static libc.a for the
# static Linux user-space tests in guests/linux). Installed when missing and we are root;
# otherwise the tests that need them skip with a message.
DEBS := cpuid:cpuid acpica-tools:iasl
debs:
	@for pair in $(DEBS); do pkg=$${pair%%:*}; cmd=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq $$pkg) >/dev/null 2>&1 \
	      || echo "note: could not install Debian package '$$pkg'; its oracle test will skip"; \
	  else echo "note: Debian package '$$pkg' missing (not root); its oracle test will skip"; fi; done
	@[ -f "$$(gcc -print-file-name=libc.a)" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq libc6-dev) >/dev/null 2>&1 \
	      || echo "note: could not install Debian package 'libc6-dev'; the guests/linux tests will skip"; \
	  else echo "note: Debian package 'libc6-dev' missing (not root); the guests/linux tests will skip"; fi; }

test: venv native debs guests linux-guest-cache
	$(PY) -m pytest -q

# The Linux guest tests/linux boots under cetvm (Debian's kernel and busybox, the kernel's
# shadow-stack selftest: ~190 MB of downloads into ~/.cache/cetvm/linux, reused afterwards).
# Without apt-get or the network those tests skip with a message; `make test` goes on.
linux-guest-cache: venv guests
	@$(VENV)/bin/cetvm linux-guest --selftest >/dev/null 2>linux-guest.log \
	  && rm -f linux-guest.log \
	  || echo "note: could not fetch the Linux guest (see linux-guest.log); the Linux boot tests will skip"

demo: venv native guests
	$(VENV)/bin/cetvm demo

bench: venv native guests
	$(VENV)/bin/cetvm bench

# A Linux guest with CET (Debian's kernel + our initramfs) in the user's cache: see
# `cetvm linux-guest --help`. LINUX_GUEST_ARGS="--selftest" adds the kernel's shadow-stack selftest.
linux-guest: venv debs
	$(MAKE) -C guests linux
	$(VENV)/bin/cetvm linux-guest $(LINUX_GUEST_ARGS)

clean:
	rm -rf $(VENV) guests/build build src/*.egg-info src/cetvm/cpu/native/*.so src/cetvm/cpu/native/*.stamp .pytest_cache

# kvm-unit-tests through cetvm's QEMU front end (and QEMU TCG when installed): docs/conformance.md.
# Opt-in and slow; KUT is a configured and built kvm-unit-tests tree (never part of this repository).
# QEMU_FROM=REPORT reuses the QEMU TCG table of an earlier report instead of running QEMU again.
JOBS ?= 2
conformance: venv native
	@test -n "$(KUT)" || { echo "usage: make conformance KUT=/path/to/built/kvm-unit-tests"; exit 2; }
	$(VENV)/bin/cetvm conformance --kut $(KUT) --jobs $(JOBS) --output docs/conformance.md $(if $(QEMU_FROM),--qemu-from $(QEMU_FROM))
