"""Serving the API with gunicorn (threads in a few processes), configured from settings."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from api import create_app
from jobs.settings import Settings


class _Server(BaseApplication):
    def __init__(self, settings: Settings, options: dict) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 2,
    threads: int = 8,
    access_log: bool = False,
) -> None:
    """Run the API in the foreground until SIGTERM/SIGINT."""
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        # gthread, with gunicorn's own 400/414/431 answers in JSON (api/gunicorn_errors.py).
        "worker_class": "api.gunicorn_errors.JsonErrorWorker",
        "timeout": 120,
        "graceful_timeout": 10,
        "keepalive": 5,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        # gunicorn's own lines (and access lines) through the same formatter as ours.
        "logconfig_dict": {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "main": {"()": "jobs.logs.formatter", "service": "api", "fmt": settings.log_format}
            },
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "main",
                    "stream": "ext://sys.stderr",
                }
            },
            "root": {"handlers": ["stderr"], "level": settings.log_level},
            "loggers": {
                "gunicorn.error": {"handlers": [], "propagate": True},
                "gunicorn.access": {"handlers": [], "propagate": True},
            },
        },
    }
    _Server(settings, options).run()
