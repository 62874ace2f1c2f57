"""The HTTP API: a Flask app factory. Imports ``jobs`` only: never ``worker``, never torch."""

from __future__ import annotations

import logging

import redis
from celery import Celery
from flask import Flask

from jobs.queue import celery_config
from jobs.records import JobStore
from jobs.settings import Settings
from jobs.storage import open_storage


def create_app(settings: Settings | None = None) -> Flask:
    """The API, configured from ``settings`` (default: the environment)."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False

    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    app.extensions["sam3d_store"] = JobStore(client)
    app.extensions["sam3d_storage"] = open_storage(settings)
    sender = Celery("sam3d-api", set_as_current=False)
    sender.conf.update(celery_config(settings))
    app.extensions["sam3d_celery"] = sender

    from api import errors, files, health, jobs, openapi

    errors.init_app(app)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    logging.getLogger("sam3d").setLevel(logging.INFO)
    return app
