# Three commands do everything on a fresh machine:
#   make smoke  # installs the requirements, runs the whole ECLIPSE pipeline on a few hundred images
#               # in a few minutes (a smoke run: its numbers mean nothing)
#   make demo   # installs the requirements, runs the CPU-scale ECLIPSE pipeline end to end, prints the table
#               # (downloads CIFAR-10 into data/cifar10 when no copy is found)
#   make test   # installs the requirements, runs the test suite
PYTHON ?= python3
SHARED ?= ../shared
# CI and the tests read the shared copy of CIFAR-10 when there is one; without it the
# scripts look in data/cifar10 and download the official archive there
ifneq ($(wildcard $(SHARED)/datasets/cifar10),)
CIFAR10_ROOT ?= $(abspath $(SHARED)/datasets/cifar10)
export CIFAR10_ROOT
endif

.PHONY: setup test smoke demo lint bench
setup:
	$(PYTHON) -m pip install -q -r requirements.txt

test: setup
	$(PYTHON) -m pytest

smoke: setup
	$(PYTHON) demo.py --tiny --baselines

demo: setup
	$(PYTHON) demo.py --baselines

lint:
	ruff check . && ruff format --check .

bench: setup
	$(PYTHON) bench/bench_precision.py
	$(PYTHON) bench/bench_purification.py
	$(PYTHON) bench/bench_training.py
	$(PYTHON) bench/bench_memory.py
	$(PYTHON) bench/bench_allocator.py
