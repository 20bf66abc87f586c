# hotswap on a CUDA-capable PyTorch runtime. Build: docker build -t hotswap .
# Run: docker run --gpus all -p 8000:8000 hotswap   (no GPU: runs on CPU)
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HOTSWAP_HOST=0.0.0.0 \
    HOTSWAP_PORT=8000 \
    HOTSWAP_STORE=/app/adapters_store

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin hotswap \
    && mkdir -p /app/server /app/adapters_store /models \
    && chown -R hotswap:hotswap /app /models

WORKDIR /app

# Dependencies first (cached while only the source changes); the base image's torch satisfies
# the torch requirement, so pip keeps it. Ray Serve is included so the image also runs the cluster
# (`python -m server.cluster`, deploy/kuberay.yaml).
COPY --chown=hotswap:hotswap pyproject.toml ./
RUN touch server/__init__.py \
    && pip install --no-cache-dir -e ".[cluster]" \
    && chown -R hotswap:hotswap /app

# The source, the embedded default model and the example adapters (see .dockerignore).
COPY --chown=hotswap:hotswap . .

USER 1000:1000

# /models: mount a base model and point HOTSWAP_MODEL at it (default: the embedded model).
# /app/adapters_store: the adapter store, kept across container restarts.
VOLUME ["/models", "/app/adapters_store"]

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HOTSWAP_PORT', '8000') + '/ready', timeout=4)"]

CMD ["python", "-m", "server"]
