# syntax=docker/dockerfile:1
# The `personalize` image: the package wheel (library, service, generated gRPC stubs) on torch, run as
# a non-root user. No tests, no load tests, no dev tools. Two variants of torch:
#   docker build -t personalize:0.1.0 .                                 # CPU (dev, kind, CI)
#   docker build --build-arg VARIANT=cuda -t personalize:0.1.0-cuda .  # NVIDIA GPUs
# The pins below are the Makefile's and pyproject.toml's; tests/unit/test_k8s.py holds them equal. Every
# install is held to constraints.txt, the pins `make venv` installs and `make test` runs with.

# Python of the Makefile's `PY` (python3.11) and pyproject's requires-python.
ARG PYTHON_VERSION=3.11
# cpu: torch's CPU-only wheels (~200 MB); cuda: PyPI's CUDA wheels (the CUDA runtime comes as pip
# packages, so the base image needs no CUDA; the node's NVIDIA driver is mounted by the device plugin).
ARG VARIANT=cpu

# ---- build: check the committed stubs, then build the wheel -----------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The same protoc as `make proto` (grpcio-tools pin of pyproject's dev extras): the committed stubs in
# service/gen must be exactly what it generates from proto/, as `make test` checks.
RUN pip install -c constraints.txt grpcio-tools==1.85.1
COPY pyproject.toml setup.py LICENSE README.md constraints.txt ./
COPY proto/ proto/
COPY personalize/ personalize/
COPY service/ service/
RUN python service/protogen.py --check
# The same command as `make wheel`: the package alone, its dependencies come from the index below.
RUN pip wheel --no-deps --wheel-dir dist .

# ---- runtime: torch of the chosen variant, then the wheel ------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

COPY --from=build /src/constraints.txt /tmp/constraints.txt

FROM runtime-base AS torch-cpu
# The Makefile's TORCH pin, from torch's CPU-only index (PyPI's Linux wheels bundle CUDA): the Makefile's
# TORCH_INDEX for this image.
RUN pip install -c /tmp/constraints.txt --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

FROM runtime-base AS torch-cuda
RUN pip install -c /tmp/constraints.txt torch==2.13.0

# checkov:skip=CKV_DOCKER_7:torch-${VARIANT} is a stage of this file, not an image, so it has no tag
FROM torch-${VARIANT} AS runtime
COPY --from=build /src/dist/ /tmp/dist/
# The `server` extra (worker, router, trainer); not `local` (the embedded Valkey of `personalize up`) nor
# `dev` (test and lint tools). torch is already installed, so pip keeps it.
RUN for wheel in /tmp/dist/personalize-*.whl; do pip install -c /tmp/constraints.txt "$wheel[server]"; done \
    && rm -rf /tmp/dist /tmp/constraints.txt
# A fixed non-root uid/gid: the Kubernetes manifests run as 10001 with runAsNonRoot.
RUN groupadd --system --gid 10001 personalize \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin personalize \
    && mkdir -p /var/lib/personalize && chown 10001:10001 /var/lib/personalize
# Settings a container needs (service/cli/settings.py): listen on all interfaces, state in a volume.
# HOME is /tmp so caches (~/.cache, torch, Hugging Face) land on the emptyDir: the root filesystem is
# read-only in Kubernetes. Models are local directories: never reach for the Hub.
ENV PERSONALIZE_HOST=0.0.0.0 \
    PERSONALIZE_DATA_DIR=/var/lib/personalize \
    HOME=/tmp \
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /var/lib/personalize
# gRPC (PERSONALIZE_PORT) and Prometheus metrics (PERSONALIZE_METRICS_PORT, off unless set).
EXPOSE 50051 9100
# checkov:skip=CKV_DOCKER_2:Kubernetes probes the gRPC health service instead; trainers have no port
ENTRYPOINT ["personalize"]
CMD ["serve", "--role", "worker"]
