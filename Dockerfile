# vlm-steer: the steering server on the embedded ShapeWorld models (CPU, default) or, with
# `--build-arg VARIANT=gpu`, with the vLLM extra for GPU machines.
#   docker build -t vlm-steer .                              # CPU
#   docker build -t vlm-steer:gpu --build-arg VARIANT=gpu .  # GPU (vLLM)
#   docker run -p 8000:8000 vlm-steer
# Other checkpoints: mount them and point the settings at them, e.g.
#   docker run -v /models:/models -e VLM_STEER_MODEL=/models/llava-1.5-7b-hf -e VLM_STEER_REWARD_MODEL=/models/rm ...
# (with a mounted model nothing embedded is used unless named: as `vlm-steer serve --model DIR`).
# Without a registry or the PyTorch index, `make image-check` builds and runs this file from a local base
# (docs/operations.md, "The image"):
#   --build-arg BASE_IMAGE=...   any Debian-based image with Python 3.11, pip and useradd
#   --build-arg TORCH_INDEX=...  the package index torch and torchvision come from
ARG VARIANT=cpu
ARG BASE_IMAGE=python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VLM_STEER_HOST=0.0.0.0 VLM_STEER_PORT=8000
RUN useradd --create-home --uid 10001 vlmsteer
WORKDIR /app

FROM base AS deps-cpu
ARG TORCH_INDEX
# The CPU build of torch from its index by default (the default wheel on Linux is the much larger CUDA build).
RUN pip install --no-cache-dir torch==2.13.0 torchvision==0.28.0 --index-url "$TORCH_INDEX"

FROM base AS deps-gpu
# vLLM brings the CUDA build of torch it was built against. Triton (vLLM's and torch.compile's kernels)
# compiles its CUDA launcher with the system C compiler at run time, against Python's headers: a slim base
# has no compiler, so install one (and the headers where the base's Python lacks them), and compile a
# Python extension's shape once here so that a base without them fails the build, not the first request.
# hadolint ignore=DL3008,SC2086
RUN inc="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    && pkgs="gcc libc6-dev" && { [ -f "$inc/Python.h" ] || pkgs="$pkgs python3-dev"; } \
    && apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/* \
    && printf '#include <Python.h>\nint f(void) { return Py_IsInitialized(); }\n' > /tmp/cc-check.c \
    && gcc -shared -fPIC -I"$inc" -o /tmp/cc-check.so /tmp/cc-check.c && rm /tmp/cc-check.*

# hadolint ignore=DL3006
FROM deps-${VARIANT} AS final
ARG VARIANT
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY decoding ./decoding
COPY reward_models ./reward_models
COPY bench ./bench
COPY shapeworld ./shapeworld
COPY models ./models
# An editable install: the code runs from /app, so the settings find the embedded models in /app/models
# (beside server/, as in a checkout) and apply the checkout's rule: the embedded reward model, verifier,
# judge and playground examples go with the embedded VLM only, never with a mounted VLM_STEER_MODEL.
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = "gpu" ]; then pip install --no-cache-dir -e '.[vllm]'; else pip install --no-cache-dir -e .; fi
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('VLM_STEER_PORT', '8000') + '/health', timeout=2)"]
# SIGTERM drains in-flight streams (VLM_STEER_DRAIN_TIMEOUT seconds) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vlm-steer", "serve"]
