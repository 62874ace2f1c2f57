# The HTTP API: Flask under gunicorn, and the web page. No torch, no mesh stack; non-root.
#   docker build -f docker/api.Dockerfile -t sam3d-jobs-api .

# The web page, bundled from its pinned npm packages (web/package-lock.json).
FROM node:20.18.0-bookworm-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --include=dev --no-audit --no-fund
COPY web/ ./
RUN npm run build

FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app
COPY requirements/base.txt requirements/api.txt requirements/
RUN pip install -r requirements/api.txt

COPY pyproject.toml README.md ./
COPY jobs/ jobs/
COPY api/ api/
COPY --from=web /src/api/static/ api/static/
COPY sam3d_jobs/ sam3d_jobs/
COPY sdk/ sdk/
# Installs the sam3d-jobs command and the SDK; jobs/, api/, worker/ run from /app (PYTHONPATH).
RUN pip install ./sdk ".[api]" \
 && useradd --create-home --uid 10001 sam3d
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["sam3d-jobs", "healthcheck", "api", "--port", "8000"]
CMD ["sam3d-jobs", "api", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--threads", "8"]
