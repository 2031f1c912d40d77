# make run   - set up and start the daemon in the foreground on /run/cma
# make test  - set up and run the whole test suite
# make bench - run the benchmarks (they print ratios, they never assert)
# make lint  - byte-compile and check the layering rules

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := fuse3 libfuse3-dev pkg-config systemd
MOUNTPOINT ?= /run/cma
PREFIX  ?= /usr/local
OPT     ?= /opt/cmad

.PHONY: run test bench lint deps apt install clean

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
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	taskset -c 1 $(PY) bench/core.py
	$(PY) bench/fs.py
	$(PY) bench/frag.py
	taskset -c 1 $(PY) bench/compact.py
	$(PY) bench/client.py
	$(PY) bench/arena.py
	$(PY) bench/gpu.py $(if $(GPU_USER),--user $(GPU_USER))
	$(PY) bench/scale.py --sizes 10k,200k,1m --growth

lint: $(STAMP)
	$(PY) -m compileall -q cmad fusefs tests bench
	$(PY) -m pyflakes cmad fusefs bench
	@! grep -rnE '^\s*(from|import)\s+cmad' fusefs --include='*.py' || (echo "fusefs must not import cmad"; exit 1)

# The service: a venv in $(OPT), commands in $(PREFIX)/bin, units, group, config.
install: apt
	test -x $(OPT)/bin/python || $(PYTHON) -m venv $(OPT)
	$(OPT)/bin/pip install -q .
	ln -sf $(OPT)/bin/cmad $(PREFIX)/bin/cmad
	ln -sf $(OPT)/bin/cmactl $(PREFIX)/bin/cmactl
	install -m 644 systemd/cmad.service systemd/cmad-hugepages.service /etc/systemd/system/
	install -D -m 644 systemd/cmad.sysusers /etc/sysusers.d/cmad.conf
	install -D -m 644 README.md $(PREFIX)/share/doc/cmad/README.md
	test -f /etc/cmad/cmad.toml || install -D -m 644 systemd/cmad.toml /etc/cmad/cmad.toml
	systemd-sysusers /etc/sysusers.d/cmad.conf 2>/dev/null || groupadd -f cma
	-systemctl daemon-reload
	@echo "installed; start with: systemctl enable --now cmad"

clean:
	rm -rf $(VENV) build *.egg-info
