# The GPU worker: SAM 3D Objects resident on one GPU, consuming jobs from Redis.
#   docker build -f docker/worker-gpu.Dockerfile -t sam3d-jobs-worker-gpu .
#   docker run --gpus '"device=0"' -v /srv/sam3d/checkpoints:/models/sam3d:ro \
#     -v /srv/sam3d/cache:/models/cache:ro --env-file .env sam3d-jobs-worker-gpu
# One container per GPU; the weights are mounted, never baked into the image.
ARG CUDA_IMAGE=nvidia/cuda:12.1.1-cudnn8-devel-ubuntu22.04
# Mesh compression (meshopt, Draco) runs the glTF Transform CLI under Node.js: built here,
# its node binary and node_modules copied into the worker below.
FROM node:20.18.1-bookworm-slim AS js
WORKDIR /js
COPY worker/js/package.json worker/js/package-lock.json ./
RUN npm ci --no-audit --no-fund --omit=dev

FROM ${CUDA_IMAGE}

ARG WITH_BAKING=false
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0" \
    MAX_JOBS=8

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
      build-essential ninja-build libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app

WORKDIR /app
COPY requirements/ requirements/
RUN pip install --upgrade pip wheel setuptools \
 && pip install -r requirements/worker.txt \
 && pip install --index-url https://download.pytorch.org/whl/cu121 -r requirements/gpu-torch.txt \
 && pip install --no-build-isolation -r requirements/gpu.txt \
 && pip install --no-deps -r requirements/gpu-sam3.txt \
 && if [ "$WITH_BAKING" = "true" ]; then pip install --no-build-isolation -r requirements/gpu-baking.txt; fi

COPY pyproject.toml README.md ./
COPY jobs/ jobs/
COPY worker/ worker/
COPY --from=js /usr/local/bin/node /usr/local/bin/node
COPY --from=js /js/node_modules worker/js/node_modules
COPY api/ api/
COPY sam3d_jobs/ sam3d_jobs/
COPY sdk/ sdk/
# Installs the sam3d-jobs command and the SDK; jobs/, api/, worker/ run from /app (PYTHONPATH).
RUN pip install ./sdk ".[worker]" \
 && useradd --create-home --uid 10001 sam3d
USER sam3d

# Attention: auto = flash-attn if installed, else PyTorch's varlen kernel (no flash-attn build
# needed; the worker sets upstream's ATTN_BACKEND variables itself before importing it).
# Weights: SAM3D_CHECKPOINT_DIR (pipeline.yaml + *.ckpt/*.yaml). MoGe from the mounted
# Hugging Face cache, DINOv2's code from a mounted torch hub folder (its weights are in the
# checkpoint, so none are fetched): nothing is downloaded at start.
ENV SAM3D_BACKEND=sam3d \
    SAM3D_ATTN_BACKEND=auto \
    LIDRA_SKIP_INIT=true \
    SAM3D_CHECKPOINT_DIR=/models/sam3d \
    SAM3D_DINOV2_DIR=/models/cache/torch/hub/facebookresearch_dinov2_main \
    HF_HOME=/models/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCH_HOME=/models/cache/torch

STOPSIGNAL SIGTERM
ENTRYPOINT ["sam3d-jobs", "worker", "--backend", "sam3d"]
CMD ["--gpu", "0"]
