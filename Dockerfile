# syntax=docker/dockerfile:1
# Multi-stage: build a venv with the CUDA torch wheel and livediff, then copy it onto a slim CUDA runtime.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM python:3.12-slim AS build
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir "$TORCH" --index-url "$TORCH_INDEX"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY livediff ./livediff
# EXTRAS=cluster adds Ray Serve for `livediff serve --cluster` and deploy/rayservice.yaml
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" nvidia-ml-py

FROM ${CUDA_IMAGE} AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.12 /usr/local/bin/python3.12
COPY --from=build /opt/venv /opt/venv
RUN ln -sf /usr/bin/python3.12 /opt/venv/bin/python && ln -sf /usr/bin/python3.12 /opt/venv/bin/python3
WORKDIR /app
COPY web ./web
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf \
    LIVEDIFF_HOST=0.0.0.0 \
    LIVEDIFF_PORT=8080 \
    LIVEDIFF_ENGINES_DIR=/app/engines \
    LIVEDIFF_WEB_DIR=/app/web
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD curl -fsSk https://127.0.0.1:8080/readyz || curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["livediff"]
CMD ["serve"]
