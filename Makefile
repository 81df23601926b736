# PAS: set-up, demo, tests, benchmarks. `make demo` and `make test` are the two entry points.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PAS := $(VENV)/bin/pas
# Debian packages the tests use as real peers (DCMTK as modality/viewer, Orthanc as the
# regional PACS, Chromium for pages).
TEST_APT := dcmtk orthanc orthanc-dicomweb chromium chromium-driver iproute2 libsystemd-dev pkg-config prometheus \
	debootstrap qemu-system-x86 qemu-utils e2fsprogs vagrant vagrant-libvirt nftables tzdata
# A hospital's outgoing HTTP proxy (tests/test_hub_proxy.py, hub.proxy).
TEST_APT += tinyproxy
DEMO_HOME ?= ./var
# bench/wan's link emulator (tests/test_wan_emulator.py, make bench-wan) is C, built at run time.
TEST_APT += gcc

.PHONY: demo test venv deps-test lint image box bench-proxy bench-ingest bench-ingest-cpu bench-associations bench-forward bench-urgent bench-heartbeat bench-hub-loop bench-idle bench-prefetch clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# Installs what the tests need when it is missing (as root; CI runs as root).
deps-test:
	@missing=""; for p in $(TEST_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run make test as root)"; exit 1; fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: venv
	$(VENV)/bin/ruff check .

# Three workers on the machine's two cores: most tests spend much of their time waiting on
# real peers (network timeouts, a paused viewer, a booting image), and two workers left a core
# idle then (16.6 min on 2 cores, measured 2026-12-04). A file's tests stay together and in
# order on one worker. The 25 slowest steps are listed at the end: the suite must stay under
# 15 minutes on 2 cores, and that list says where its time goes.
#
# The suite starts ~1,000 Python processes (`pas run`, `pas hub run`, the CLI). Where
# PYTHONDONTWRITEBYTECODE is set (this machine, CI) none writes its bytecode, and each compiled
# PAS's 179 modules from source again: compiled once here, every process reads them.
test: deps-test venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m compileall -q appliance tests bench > /dev/null
	$(VENV)/bin/pytest -q -p no:cacheprovider -n 3 --dist loadfile --durations=25

demo: venv
	@scripts/demo.sh "$(DEMO_HOME)"

# Issue 7: the fault-injection suite and the fuzzers alone (both also run in `make test`).
# PAS_FAULT_ROUNDS / PAS_FAULT_UPLOAD_ROUNDS / PAS_FUZZ_SECONDS lengthen them.
.PHONY: test-faults test-fuzz
test-faults: deps-test venv
	$(VENV)/bin/pytest -q -s -p no:cacheprovider tests/faults

test-fuzz: venv
	$(VENV)/bin/pytest -q -s -p no:cacheprovider tests/fuzz

bench-ingest: deps-test venv
	$(PY) bench/ingest.py

# Where a C-STORE's time goes: CPU per instance of PAS, storescp and the senders (BENCH_ARGS="--senders 4").
bench-ingest-cpu: deps-test venv
	$(PY) bench/ingest_cpu.py $(BENCH_ARGS)

# One association per image (storescu per file), PAS next to storescp: images/s and CPU per association.
bench-associations: deps-test venv
	$(PY) bench/associations.py $(BENCH_ARGS)

# Forwarding to the hospital's PACS (a dicom destination = storescp), next to storescu sending the same sets.
bench-forward: deps-test venv
	$(PY) bench/forward.py $(BENCH_ARGS)

# The emulated WAN (bench/wan): storescu, Orthanc STOW-RS and PAS over the same links.
# BENCH_ARGS=--quick for the 20 Mbit/s link only. Root (network namespaces, TUN).
bench-wan: deps-test venv
	$(PY) -m bench.wan.run $(BENCH_ARGS)

# PAS alone on the emulated WAN: 30 s outage mid-CT, hub.max_mbps held over 60 s, peak RSS
# sending a ~2 GB study (BENCH_ARGS="outage" or "cap" or "memory --big-gb 1" to pick).
bench-wan-scenarios: deps-test venv
	$(PY) -m bench.wan.scenarios $(BENCH_ARGS)

# Packing (JPEG-LS + solid zstd) ratio and speed per level on the CT and MR sets, with baselines.
bench-codec: venv
	$(PY) bench/codec.py $(BENCH_ARGS)

# Prefetch: ORM -> every CT prior on site over the emulated 20 Mbit/s link, beside getscu.
bench-prefetch: deps-test venv
	$(PY) bench/prefetch.py $(BENCH_ARGS)

# The hub's own cost on loopback: PUT+commit (embedded, and STOW-RS into Orthanc) vs STOW-RS direct.
bench-hub: deps-test venv
	$(PY) bench/hub.py

# The uplink kinds (stowrs, hub) next to storescu into Orthanc, and the Mbit/s cap (root).
bench-uplink: deps-test venv
	$(PY) bench/uplink.py $(BENCH_ARGS)

# The uplink straight to the hub against the same through the hospital's proxy (tinyproxy).
bench-proxy: deps-test venv
	$(PY) bench/proxy.py $(BENCH_ARGS)

# C-FIND latency on 100,000 synthesized studies; C-FIND and C-MOVE next to Orthanc (root).
bench-qr: deps-test venv
	$(PY) bench/qr.py $(BENCH_ARGS)

# An emergency CT's last slice to the region: urgent batches next to waiting for stability.
bench-urgent: deps-test venv
	$(PY) bench/urgent.py $(BENCH_ARGS)

bench-heartbeat: deps-test venv
	$(PY) bench/heartbeat.py

# How long other sites' requests wait while the hub takes in a 100,000-instance manifest;
# the fleet's site page with one site's history flooded (200,000 rows).
bench-hub-loop: deps-test venv
	$(PY) bench/hub_loop.py $(BENCH_ARGS)
	$(PY) bench/fleet_page.py

# CPU an idle `pas run` uses (its defaults), beside an idle Orthanc.
bench-idle: deps-test venv
	$(PY) bench/idle_cpu.py $(BENCH_ARGS)

# The appliance image (root): Debian 12 minimal + PAS under /opt/pas; see image/README.md.
image: deps-test
	bash image/build.sh image/out

# The image as a Vagrant box (libvirt provider) for the Vagrantfile's three machines.
box: image
	bash image/box.sh image/out

clean:
	rm -rf $(VENV) var .pytest_cache image/out
