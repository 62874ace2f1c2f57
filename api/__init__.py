"""The HTTP API: a Flask app factory. Imports ``jobs`` only: never ``worker``, never torch."""

from __future__ import annotations

import logging

import redis
from celery import Celery
from flask import Flask, g, request

from api.body import BodyGuard
from api.json_input import InputJSONProvider
from jobs.batches import BatchStore
from jobs.limits import Limits
from jobs.logs import job_id_var
from jobs.notify import Notifier
from jobs.queue import celery_config
from jobs.records import JobStore
from jobs.settings import Settings
from jobs.storage import open_storage


def create_app(settings: Settings | None = None) -> Flask:
    """The API, configured from ``settings`` (default: the environment)."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.json = InputJSONProvider(app)  # bodies: no NaN/Infinity/1e400, bounded nesting
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    # Form text fields (a polygon list can be MBs) up to the body limit, not werkzeug's 500 KB.
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_request_bytes
    app.json.sort_keys = False

    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    sender = Celery("sam3d-api", set_as_current=False)
    sender.conf.update(celery_config(settings))
    batches = BatchStore(client)
    store = JobStore(client, on_terminal=Notifier(sender, batches).job_finished)
    app.extensions["sam3d_store"] = store
    app.extensions["sam3d_batches"] = batches
    app.extensions["sam3d_storage"] = open_storage(settings)
    app.extensions["sam3d_celery"] = sender
    app.extensions["sam3d_limits"] = Limits(
        store,
        rate_per_s=settings.submit_rate_per_s,
        burst=settings.submit_burst,
        max_in_flight=settings.max_in_flight,
    )

    from api import backends as backends_routes
    from api import batches as batches_routes
    from api import errors, files, health, jobs, openapi, roboflow, web

    errors.init_app(app)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(batches_routes.bp)
    app.register_blueprint(backends_routes.bp)
    app.register_blueprint(roboflow.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(web.bp)
    logging.getLogger("sam3d").setLevel(settings.log_level)
    # Bodies read whole, under the size limit and a stall timeout, before any view runs.
    app.wsgi_app = BodyGuard(app.wsgi_app, settings)  # type: ignore[method-assign]

    @app.before_request
    def _tag_job() -> None:
        job_id = (request.view_args or {}).get("job_id")
        g.job_token = job_id_var.set(job_id) if job_id else None

    @app.teardown_request
    def _untag_job(_exc) -> None:
        token = g.pop("job_token", None)
        if token is not None:
            job_id_var.reset(token)

    return app
