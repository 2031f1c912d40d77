# make run   - set up and start the daemon in the foreground on /run/cma
# make test  - set up and run the whole test suite
# make bench - run the benchmarks (they print ratios, they never assert)
# make lint  - ruff, the import layers, function and module sizes
# make test-fast - the core and fusefs-operations tiers only

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := fuse3 libfuse3-dev pkg-config systemd
MOUNTPOINT ?= /run/cma
PREFIX  ?= /usr/local
OPT     ?= /opt/cmad

.PHONY: run test test-fast bench lint deps apt install clean

deps: $(STAMP)

# Debian packages, only those missing.
apt:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# A venv with the project and its test tools.
$(STAMP): pyproject.toml | apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p $(MOUNTPOINT)
	$(VENV)/bin/cmad --mountpoint $(MOUNTPOINT)

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q $(PYTEST_ARGS)

# All but the real mounts and the stress loops: the core and the fusefs operations.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not mount and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	taskset -c 1 $(PY) bench/core.py
	taskset -c 1 $(PY) bench/core_compare.py
	$(PY) bench/fs.py
	$(PY) bench/frag.py
	taskset -c 1 $(PY) bench/compact.py
	$(PY) bench/client.py
	$(PY) bench/arena.py
	$(PY) bench/gpu.py $(if $(GPU_USER),--user $(GPU_USER))
	$(PY) bench/scale.py --sizes 10k,200k,1m --growth
	$(PY) bench/trace.py

# ruff (pyflakes' rules), the layers (import-linter, pyproject.toml), the sizes.
lint: $(STAMP)
	$(PY) -m compileall -q cmad fusefs tests bench
	$(VENV)/bin/ruff check -q cmad fusefs bench tests
	$(VENV)/bin/lint-imports --no-cache
	$(PY) tools/sizes.py

# The service: a venv in $(OPT), commands in $(PREFIX)/bin, units, group, config.
install: apt
	test -x $(OPT)/bin/python || $(PYTHON) -m venv $(OPT)
	$(OPT)/bin/pip install -q .
	ln -sf $(OPT)/bin/cmad $(PREFIX)/bin/cmad
	ln -sf $(OPT)/bin/cmactl $(PREFIX)/bin/cmactl
	install -m 644 systemd/cmad.service systemd/cmad-hugepages.service /etc/systemd/system/
	install -D -m 644 systemd/cmad.sysusers /etc/sysusers.d/cmad.conf
	install -D -m 644 README.md $(PREFIX)/share/doc/cmad/README.md
	install -d $(PREFIX)/share/doc/cmad/docs && install -m 644 docs/*.md $(PREFIX)/share/doc/cmad/docs/
	test -f /etc/cmad/cmad.toml || install -D -m 644 systemd/cmad.toml /etc/cmad/cmad.toml
	systemd-sysusers /etc/sysusers.d/cmad.conf 2>/dev/null || groupadd -f cma
	-systemctl daemon-reload
	@echo "installed; start with: systemctl enable --now cmad"

clean:
	rm -rf $(VENV) build *.egg-info
