# propserve: the model server (gRPC on 50051, REST on 8000) with its store on the /data volume.
#
#   docker build -t propserve .                          # official python slim base
#   docker build --build-arg BASE_IMAGE=local/python:3.11-bookworm -t propserve .
#
# Any base with python3 (3.11+), its venv module and pip works. PIP_INDEX_URL and
# PIP_EXTRA_INDEX_URL may point pip at a mirror; empty, pip uses PyPI.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Only what the package needs, so that edits to tests or docs do not invalidate this layer.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY service ./service
COPY clients ./clients
COPY propserve ./propserve
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile '.[server,onnx]' \
    && rm -rf /src/build /src/*.egg-info

RUN groupadd --system --gid 10001 propserve \
    && useradd --system --uid 10001 --gid propserve --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin propserve \
    && mkdir -p /data \
    && chown propserve:propserve /data

# Listening beyond loopback needs tokens (PROPSERVE_TOKENS or PROPSERVE_TOKENS_FILE) or
# PROPSERVE_INSECURE=true: the server refuses to start otherwise. docker-compose.yml passes
# tokens from .env.
ENV PATH=/opt/venv/bin:$PATH \
    PROPSERVE_STORE=/data \
    PROPSERVE_REST_HOST=0.0.0.0 \
    PROPSERVE_GRPC_HOST=0.0.0.0
VOLUME /data
WORKDIR /data
USER propserve
EXPOSE 8000 50051

# Ready when /readyz answers 200 (the store is open and the server is not draining); no curl
# in the image, so Python's urllib asks.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('PROPSERVE_REST_PORT', '8000'); sys.exit(0 if u.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status == 200 else 1)"]

CMD ["propserve", "serve"]
