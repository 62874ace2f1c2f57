"""``GET /``: the web page that submits jobs and shows their results in 3D.

The page is built from ``web/`` (npm packages, bundled by esbuild) into ``api/static/`` by
``make install``; Flask's own static route serves the bundle at ``/static/...``. Nothing is
fetched from the internet at run time.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, send_file

bp = Blueprint("web", __name__)

NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sam3d-jobs: page not built</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto;
  padding: 0 1rem">
<h1>The web page is not built</h1>
<p>This service's page is bundled from npm packages when the project is installed.
Run <code>make install</code> in the project folder (it needs Node.js and npm), then reload.</p>
<p>The API works without it: <a href="openapi.json">openapi.json</a> describes every route.</p>
</body></html>
"""


@bp.get("/")
def index():
    page = Path(current_app.static_folder or "") / "index.html"
    if not page.is_file():
        return Response(
            NOT_BUILT,
            status=503,
            mimetype="text/html",
            headers={"Cache-Control": "no-store"},
        )
    response = send_file(page, mimetype="text/html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
