# vlm-steer: the steering server on the embedded ShapeWorld models (CPU, default) or, with
# `--build-arg VARIANT=gpu`, with the vLLM extra for GPU machines.
#   docker build -t vlm-steer .                              # CPU
#   docker build -t vlm-steer:gpu --build-arg VARIANT=gpu .  # GPU (vLLM)
#   docker run -p 8000:8000 vlm-steer
# Other checkpoints: mount them and point the settings at them, e.g.
#   docker run -v /models:/models -e VLM_STEER_MODEL=/models/llava-1.5-7b-hf -e VLM_STEER_REWARD_MODEL=/models/rm ...
ARG VARIANT=cpu

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VLM_STEER_HOST=0.0.0.0 VLM_STEER_PORT=8000
RUN useradd --create-home --uid 10001 vlmsteer
WORKDIR /app

FROM base AS deps-cpu
# The CPU build of torch (the default wheel on Linux is the much larger CUDA build).
RUN pip install --no-cache-dir torch==2.13.0 torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu

FROM base AS deps-gpu
# vLLM brings the CUDA build of torch it was built against.

# hadolint ignore=DL3006
FROM deps-${VARIANT} AS final
ARG VARIANT
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY decoding ./decoding
COPY reward_models ./reward_models
COPY shapeworld ./shapeworld
COPY models ./models
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = "gpu" ]; then pip install --no-cache-dir '.[vllm]'; else pip install --no-cache-dir .; fi
# The embedded models live in /app/models; a volume mounted there (or VLM_STEER_MODEL and friends)
# replaces them. (The installed package does not hold them, so every embedded default is named here.)
ENV VLM_STEER_MODEL=/app/models/shapeworld/vlm \
    VLM_STEER_REWARD_MODEL=/app/models/shapeworld/reward \
    VLM_STEER_VERIFIER=/app/models/shapeworld/verifier \
    VLM_STEER_GROUNDING_VERIFIER=/app/models/shapeworld/judge \
    VLM_STEER_PLAYGROUND_EXAMPLES=/app/models/shapeworld/examples
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('VLM_STEER_PORT', '8000') + '/health', timeout=2)"]
# SIGTERM drains in-flight streams (VLM_STEER_DRAIN_TIMEOUT seconds) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vlm-steer", "serve"]
