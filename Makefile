# picograd: `make run` trains a small Llama on a built-in corpus and samples from it; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PICOGRAD_CACHE ?= $(CURDIR)/.venv/kernel-cache

.PHONY: run test test-gpu test-asan fuzz soak bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(PY) llama.py

# generated kernels are compiled with warnings as errors here, so the renderers stay warning-free
test: $(VENV)/.installed
	PICOGRAD_CFLAGS="-Wall -Werror" $(PY) -m pytest -q -x test_picograd.py

# the whole suite with CUDA as the device (on a machine with a GPU; uses the system Python there if no venv)
test-gpu:
	DEVICE=CUDA $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pytest -q test_picograd.py $(PYTEST_ARGS)

# the CPU tests with every generated kernel built under AddressSanitizer (the interpreter preloads its runtime)
test-asan: $(VENV)/.installed
	PICOGRAD_ASAN=1 PICOGRAD_CACHE=$(CURDIR)/.venv/kernel-cache-asan ASAN_OPTIONS=detect_leaks=0 \
		LD_PRELOAD=$$(gcc -print-file-name=libasan.so) $(PY) -m pytest -q -x test_picograd.py

# a long fuzzing run: new random graphs every time (set FUZZ_SEED to replay one)
fuzz: $(VENV)/.installed
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-2000} FUZZ_SEED=$${FUZZ_SEED:-$$RANDOM} $(PY) -m pytest -q -x test_picograd.py -k fuzz_against

# 10,000 training steps in eager, graph and compiled mode: memory at step 10 and at the end
soak: $(VENV)/.installed
	PICOGRAD_SOAK_STEPS=10000 $(PY) -m pytest -q -s test_picograd.py -k long_run

bench: $(VENV)/.installed
	$(PY) bench.py

clean:
	rm -rf $(VENV) __pycache__ .pytest_cache
