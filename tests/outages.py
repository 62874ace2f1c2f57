"""Helpers for the outage tests: a webhook receiver that counts each job's terminal events,
the stack they share, and waiting for jobs under a supervisor that restarts stalled workers."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from service import make_stack

TERMINAL = ("succeeded", "failed", "canceled")
SECRET = "outage-webhook-secret"
HEARTBEAT_TTL_S = 3.0


def outage_stack(path, extra_env: dict | None = None, **settings):
    """A started dev stack for an outage: fast heartbeats (a dead worker's job is reclaimed
    within seconds), webhooks allowed to the loopback receiver, one worker at 1 s per object."""
    stack = make_stack(
        path,
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=HEARTBEAT_TTL_S,
        allow_private_urls=True,  # the webhook receiver is on loopback
        webhook_secret=SECRET,
        **settings,
    )
    stack.extra_env.update(extra_env or {})
    try:
        stack.start(wait=False)
        stack.start_worker(backend="fixture_backends:SlowInflate")  # 1 s per object
        stack.wait_ready(60)
    except BaseException:
        stack.stop()
        raise
    return stack


class TerminalEvents:
    """A loopback webhook endpoint: every ``job.*`` event recorded by job id. A job's webhook is
    queued by the one transition that makes it terminal, so exactly one event per job means it
    ended exactly once."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict]] = defaultdict(list)
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                job = body["data"].get("job") or {}
                events[job.get("id", "?")].append(
                    {"type": body["type"], "id": body["id"], "at": time.monotonic()}
                )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def poll_until_terminal(stack, http, ids: list[str], timeout: float) -> dict[str, dict]:
    """Poll jobs until every one is terminal, restarting workers that exit asking for it (the
    consumer watchdog's code 75) as a container's restart policy would. Returns each job as
    first seen terminal, with ``seen_at`` (monotonic)."""
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while True:
        stack.supervise()
        for job_id in ids:
            if job_id not in done:
                job = http.json("GET", f"/v1/jobs/{job_id}")
                if job["status"] in TERMINAL:
                    done[job_id] = {**job, "seen_at": time.monotonic()}
        if len(done) == len(ids):
            return done
        if time.monotonic() > deadline:
            states = {i: http.json("GET", f"/v1/jobs/{i}")["status"] for i in ids}
            raise AssertionError(f"not terminal after {timeout} s: {states}")
        time.sleep(0.2)


def assert_ended_once(stack, http, events: TerminalEvents, finals: dict[str, dict],
                      settle_s: float) -> None:  # fmt: skip
    """Each job stays as it first ended (past the reaper's grace: nothing reopens it), and its
    webhook got exactly one terminal event, of that status."""
    deadline = time.monotonic() + 30
    while not all(events.events.get(job_id) for job_id in finals):
        assert time.monotonic() < deadline, f"webhooks missing: {dict(events.events)}"
        time.sleep(0.1)
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        stack.supervise()
        time.sleep(0.2)
    for job_id, first in finals.items():
        job = http.json("GET", f"/v1/jobs/{job_id}")
        assert (job["status"], job["finished_at"]) == (first["status"], first["finished_at"])
        got = [e["type"] for e in events.events.get(job_id, [])]
        assert got == [f"job.{first['status']}"], (job_id, got)
