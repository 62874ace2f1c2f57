# The HTTP API: Flask under gunicorn. No torch, no mesh stack; runs as a non-root user.
#   docker build -f docker/api.Dockerfile -t sam3d-jobs-api .
FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements/base.txt requirements/api.txt requirements/
RUN pip install -r requirements/api.txt

COPY pyproject.toml README.md ./
COPY jobs/ jobs/
COPY api/ api/
COPY client/ client/
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 sam3d
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["sam3d-jobs", "healthcheck", "api", "--port", "8000"]
CMD ["sam3d-jobs", "api", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--threads", "8"]
