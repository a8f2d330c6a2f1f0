# Two commands do everything on a fresh machine:
#   make demo   # installs the requirements, runs the CPU-scale ECLIPSE pipeline end to end, prints the table
#   make test   # installs the requirements, runs the test suite
PYTHON ?= python3
SHARED ?= ../shared
CIFAR10_ROOT ?= $(abspath $(SHARED)/datasets/cifar10)
export CIFAR10_ROOT

.PHONY: setup test demo lint bench
setup:
	$(PYTHON) -m pip install -q -r requirements.txt

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(PYTHON) demo.py --baselines

lint:
	ruff check . && ruff format --check .

bench: setup
	$(PYTHON) bench/bench_purification.py
	$(PYTHON) bench/bench_training.py
	$(PYTHON) bench/bench_memory.py
