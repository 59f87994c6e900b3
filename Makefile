# membrane — set-up, tests, demo and benchmarks. Every target installs what it needs first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
# Debian packages the project drives: the kernel's userspace, the CNI runtime stack for the
# CNI tests, the traffic generators for the benchmarks, the store for clusters.
APT_PACKAGES := nftables iproute2 util-linux procps conntrack podman runc containernetworking-plugins \
                busybox-static iperf3 gcc libc6-dev etcd-server etcd-client iptables openssl
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-kernel test-e2e lint demo bench clean protos

setup: .stamp-apt $(VENV)/.stamp-pip

.stamp-apt: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(VENV)/.stamp-pip: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

test-kernel: setup
	$(VENV)/bin/pytest -q tests/kernel $(PYTEST_ARGS)

test-e2e: setup
	$(VENV)/bin/pytest -q tests/e2e $(PYTEST_ARGS)

# The main job: a fresh two-node lab named "demo" on the embedded store, the Star Wars demo across it.
demo: setup
	@$(VENV)/bin/membrane lab down --name demo >/dev/null 2>&1 || true
	$(VENV)/bin/membrane lab up --nodes 2 --name demo
	$(VENV)/bin/membrane --lab demo lab demo starwars

# The observer API's Python modules, generated from proto/ and committed; run after editing a .proto.
PB := src/membrane/observe/pb
protos: setup
	rm -f $(PB)/*/*_pb2*.py $(PB)/*/*_pb2.pyi
	cd proto && ../$(PY) -m grpc_tools.protoc -I . --python_out=../$(PB) --pyi_out=../$(PB) */*.proto
	cd proto && ../$(PY) -m grpc_tools.protoc -I . --grpc_python_out=../$(PB) observer/observer.proto peer/peer.proto health/health.proto
	sed -i -E 's/^from (flow|relay|observer|peer|health) import /from membrane.observe.pb.\1 import /' $(PB)/*/*_pb2*.py $(PB)/*/*_pb2.pyi

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .stamp-apt .pytest_cache .mypy_cache .ruff_cache
