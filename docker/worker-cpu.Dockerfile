# A CPU worker with the embedded inflate backend (no torch, no GPU); non-root.
#   docker build -f docker/worker-cpu.Dockerfile -t sam3d-jobs-worker-cpu .
# Mesh compression (meshopt, Draco) runs the glTF Transform CLI under Node.js: built here,
# its node binary and node_modules copied into the worker below.
FROM node:20.18.1-bookworm-slim AS js
WORKDIR /js
COPY worker/js/package.json worker/js/package-lock.json ./
RUN npm ci --no-audit --no-fund --omit=dev

FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app
COPY requirements/base.txt requirements/worker.txt requirements/
RUN pip install -r requirements/worker.txt

COPY pyproject.toml README.md ./
COPY jobs/ jobs/
COPY worker/ worker/
COPY --from=js /usr/local/bin/node /usr/local/bin/node
COPY --from=js /js/node_modules worker/js/node_modules
COPY sam3d_jobs/ sam3d_jobs/
COPY sdk/ sdk/
# Installs the sam3d-jobs command and the SDK; jobs/, api/, worker/ run from /app (PYTHONPATH).
RUN pip install ./sdk ".[worker]" \
 && useradd --create-home --uid 10001 sam3d
USER 10001

HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
  CMD ["sam3d-jobs", "healthcheck", "worker"]
STOPSIGNAL SIGTERM
CMD ["sam3d-jobs", "worker", "--backend", "inflate"]
