# syntax=docker/dockerfile:1
# Trainer image: the student trainer (PyTorch + Triton Dense-KL kernels) and the teacher
# client. Many of these share one teacher service.
#
#   docker build -f deploy/docker/trainer.Dockerfile -t hybrid-distill/trainer:0.1.0 .
#
# Built from the repository root. Base images are pinned by tag only: digests cannot be
# resolved from the offline build/CI machines this repo is checked on; a release
# pipeline with registry access should pin them by digest (`FROM image:tag@sha256:...`).

FROM python:3.12.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md hybrid_distill_cli.py ./
COPY teacher_service ./teacher_service
COPY trainer ./trainer
# torch is pinned explicitly: pyproject only gives a lower bound (see its comment).
# TORCH_INDEX_URL empty: PyPI's torch (CUDA). CPU-only clusters (cpu-dev, kind) build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# which installs the +cpu build (no CUDA libraries); the project install then keeps it.
ARG TORCH_INDEX_URL=""
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0" \
    && /opt/venv/bin/pip install --no-cache-dir ".[triton]"

FROM python:3.12.11-slim-bookworm
LABEL org.opencontainers.image.title="hybrid-distill trainer" \
      org.opencontainers.image.description="Hybrid distillation + RL trainer, client of the shared teacher" \
      org.opencontainers.image.licenses="Apache-2.0"
# Triton (inside vLLM and torch, and the trainer's own Dense-KL kernels) compiles a small
# C launcher with the system C compiler the first time it runs a kernel on a GPU
# ("Failed to find C compiler" without one); Python.h is already in this base image.
# gcc is pinned; libc6-dev must equal the base image's libc6 exactly, so apt resolves it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 trainer \
    && useradd --system --uid 10001 --gid trainer --no-create-home --home-dir /tmp trainer
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/triton \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 9400
# The trainer serves its Prometheus metrics on 9400 (--run.metrics-port); a process that
# no longer answers there is wedged.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9400/metrics', timeout=4).status != 200)"]
ENTRYPOINT ["hybrid-distill"]
CMD ["train", "--config", "/etc/hybrid-distill/train.yaml", "--run.metrics-port", "9400"]
