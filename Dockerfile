# syntax=docker/dockerfile:1
# The whole Moondream 2 server (front end, broker, preprocess workers, GPU
# worker) in one container under supervisord.
#
#   docker build -t moondream-server .
#   docker run --gpus all -p 5000:5000 -e VLM_API_KEY=... -v moondream-hf:/data/hf moondream-server
#
# The container listens on every address (HOST=0.0.0.0), so it refuses to start
# without VLM_API_KEY, unless ALLOW_UNAUTHENTICATED=1 says to serve anyone.
#
# or `docker compose up` (docker-compose.yaml).  Settings are environment
# variables, all listed in shared/config.py (VLM_API_KEY, MOONDREAM_REVISION,
# PREPROCESS_WORKERS, BATCH_SIZE, ...).  The weights are downloaded into the
# /data/hf volume on first start and reused afterwards.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# torch wheels built for the base image's CUDA 12.4.
ARG TORCH_VERSION=2.6.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 comes from Ubuntu's jammy-updates (the image's default is 3.10).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies before the code, so that editing code does not reinstall torch.
# The venv lives at /app/.venv because supervisord.conf starts %(here)s/.venv/bin/python.
COPY requirements.txt ./
RUN python3.11 -m venv /app/.venv \
 && /app/.venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && /app/.venv/bin/pip install -r requirements.txt
ENV PATH=/app/.venv/bin:$PATH

COPY . .

# A non-root user owns only what it must write: the run directory (logs,
# supervisord socket) and the Hugging Face cache.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin moondream \
 && mkdir -p /app/run /data/hf /data/batch \
 && chown -R moondream:moondream /app/run /data/hf /data/batch
USER moondream

ENV HF_HOME=/data/hf \
    RUN_DIR=/app/run \
    BATCH_DATA_DIR=/data/batch \
    HOST=0.0.0.0 \
    PORT=5000 \
    MOONDREAM_DEVICE=cuda
VOLUME ["/data/hf", "/data/batch"]
EXPOSE 5000

# /health is 200 only once a GPU worker has loaded the model; the first start
# downloads the weights, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '5000'), timeout=4)"]

# FRONTEND_WORKERS and PREPROCESS_WORKERS: as set, or sized from the container's CPUs (its --cpus quota);
# the front ends' metrics files start afresh with the container (supervisord.conf).
# A setting that cannot work (no VLM_API_KEY, PORT=abc) ends the container here with one line (exit 78).
CMD ["sh", "-c", "rm -rf \"$RUN_DIR/frontend-metrics\" && sizes=\"$(python -m shared.sizes)\" && eval \"$sizes\" && python -m shared.model_family \"$RUN_DIR/gpu_workers\" && exec supervisord -c /app/supervisord.conf"]
