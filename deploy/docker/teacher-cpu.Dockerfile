# syntax=docker/dockerfile:1
# Teacher service image for CPU-only clusters (the cpu-dev overlay, kind, minikube): the
# PyTorch backend on CPU, no CUDA, no vLLM, no Triton. A few hundred MB instead of the
# multi-GB CUDA/vLLM image.
#
#   docker build -f deploy/docker/teacher-cpu.Dockerfile -t hybrid-distill/teacher-cpu:0.1.0 .
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
# torch first, the +cpu build from PyTorch's CPU index (PyPI's Linux torch wheel pulls
# the CUDA libraries); then the project without extras, whose torch>=2.5 requirement the
# CPU build already satisfies, so pip installs no second torch.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
    && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.12.11-slim-bookworm
LABEL org.opencontainers.image.title="hybrid-distill teacher (CPU)" \
      org.opencontainers.image.description="Shared teacher scoring service, PyTorch backend on CPU" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 teacher \
    && useradd --system --uid 10001 --gid teacher --no-create-home --home-dir /tmp teacher
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 50051 8000
# /healthz is liveness only (the process serves HTTP); readiness is Kubernetes' job.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["hybrid-distill"]
CMD ["serve", "--model", "/models/teacher", "--backend", "torch", "--device", "cpu", "--dtype", "float32", "--grpc-port", "50051", "--http-port", "8000"]
