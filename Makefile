# cdp: the two commands that matter are `make lab` and `make test`.
SHELL := /bin/bash
LAB_DIR ?= ./lab
DISK_SIZE ?= 1G
DISKS ?= 1
CDPCTL := .venv/bin/python -m cdpctl

.PHONY: help setup lab lab-down lab-status test lint proto clean install-systemd testbed

help:
	@echo "make lab        set up, then start a local lab in $(LAB_DIR) ($(DISKS) disk of $(DISK_SIZE))"
	@echo "make lab-status which lab processes run"
	@echo "make lab-down   stop the lab (data is kept)"
	@echo "make test       set up, then ruff, mypy and every test tier"
	@echo "make setup      only the idempotent set-up (apt packages, .venv, protos)"
	@echo "make lint       ruff and mypy only"
	@echo "make proto      regenerate cdp_common/pb from proto/"
	@echo "make install-systemd  install to /opt/cdp with systemd units (root; docs/OPERATIONS.md)"
	@echo "make testbed    docker-compose test bed: up, replicate, kill a proxy, partition, restore, down"
	@echo "                (VARIANT=etcd make testbed: two coordinators on etcd, the leader killed)"

setup:
	scripts/bootstrap.sh

lab: setup
	$(CDPCTL) lab up --dir $(LAB_DIR) --disks $(DISKS) --disk-size $(DISK_SIZE)

lab-down:
	$(CDPCTL) lab down --dir $(LAB_DIR)

lab-status:
	$(CDPCTL) lab status --dir $(LAB_DIR)

test: setup
	scripts/test.sh

lint: setup
	.venv/bin/ruff check cdp_common cdp_filter cdp_proxy cdp_target cdp_coordinator cdpctl tests
	.venv/bin/mypy cdp_common cdp_filter cdp_proxy cdp_target cdp_coordinator cdpctl

proto:
	PYTHON=.venv/bin/python scripts/gen_proto.sh

install-systemd:
	deploy/install-systemd.sh

testbed: setup
	WHEELS=1 VARIANT=$(VARIANT) deploy/compose/run-testbed.sh

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis
