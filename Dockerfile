# NNoculation: one image for the API (`serve`, the default), the repair worker (`worker`) and
# the offline CLI (`predeploy`, `store import`, ...). docs/operations.md has the commands.
#
#   docker build -t nnoculation .                                   # CPU (default)
#   docker build --build-arg TORCH_VARIANT=cu126 -t nnoculation:cu126 .  # CUDA 12.6 wheels
#
# The CUDA wheels bring their own CUDA libraries; the host needs the NVIDIA driver and
# container toolkit (docker run --gpus all ...). No container engine runs where this project is
# developed: tests/test_deploy_files.py lints this file with hadolint and cross-checks it
# against the CLI; the image itself has not been built there.

ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS build
# cpu, or a CUDA variant of the PyTorch wheel index (cu126, cu128, ...).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index of the chosen variant, so `pip install .` finds it
# satisfied instead of pulling the default (CUDA) wheel from PyPI.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY nnoculation ./nnoculation
COPY service ./service
COPY worker ./worker
# The package itself, with boto3 for the S3 model store (NNOC_STORE_ROOT=s3://...).
RUN pip install --no-cache-dir "./[s3]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="nnoculation" \
      org.opencontainers.image.description="NNoculation API, repair worker and CLI" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 nnoc \
    && useradd --system --uid 10001 --gid nnoc --home-dir /var/lib/nnoc --no-create-home nnoc \
    && mkdir -p /var/lib/nnoc/store /var/lib/nnoc/store-cache /var/lib/nnoc/spool \
    && chown -R nnoc:nnoc /var/lib/nnoc
COPY --from=build /opt/venv /opt/venv
# Writable places are /tmp (the CLI's metrics folder, matplotlib's cache) and /var/lib/nnoc
# (store, the local cache of an s3:// store, spool), so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    NNOC_STORE_ROOT=/var/lib/nnoc/store \
    NNOC_STORE_CACHE_DIR=/var/lib/nnoc/store-cache \
    NNOC_SPOOL_DIR=/var/lib/nnoc/spool
WORKDIR /var/lib/nnoc
USER 10001:10001
# 8000: the API and its /metrics; 9101: the worker's /metrics.
EXPOSE 8000 9101
# Liveness of the API (the worker's compose service and Kubernetes probes override this).
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["nnoculation"]
CMD ["serve", "--host", "0.0.0.0"]
