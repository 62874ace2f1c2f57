"""Settings: secrets stay out of repr and logs; every setting is read somewhere."""

from __future__ import annotations

from pathlib import Path

from jobs.settings import SECRET_FIELDS, Settings, redact_url


def test_repr_hides_secrets_and_url_passwords():
    settings = Settings.from_env(
        {
            "SAM3D_REDIS_URL": "redis://default:hunter2@redis:6379/0",
            "SAM3D_API_KEYS": "key-one,key-two",
            "SAM3D_SIGNING_SECRET": "sign-me",
            "SAM3D_WEBHOOK_SECRET": "hook-me",
            "SAM3D_STORAGE_URL": "s3://bucket/prefix",
        }
    )
    shown = repr(settings)
    for secret in ("hunter2", "key-one", "key-two", "sign-me", "hook-me"):
        assert secret not in shown
    assert "redis://default:***@redis:6379/0" in shown
    assert "s3://bucket/prefix" in shown and "api_keys='***'" in shown
    assert str(settings) == shown
    # The values themselves are untouched, and child processes still get them.
    assert settings.api_keys == ("key-one", "key-two")
    assert settings.to_env()["SAM3D_WEBHOOK_SECRET"] == "hook-me"
    assert {name for name in Settings.__dataclass_fields__} >= SECRET_FIELDS


def test_unset_secrets_show_as_empty():
    shown = repr(Settings())
    assert "signing_secret=''" in shown and "api_keys=()" in shown


def test_redact_url_keeps_urls_without_a_password():
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://user@h/0") == "redis://user@h/0"
    assert redact_url("rediss://:pw@h:6380/1") == "rediss://:***@h:6380/1"


def test_worker_queues_default_to_sam3d_queues(monkeypatch):
    from sam3d_jobs import cli

    seen = {}

    def fake_run_worker(settings, *, backend, queues, loglevel, gpu):
        seen["queues"] = queues

    monkeypatch.setattr("worker.celery_app.run_worker", fake_run_worker)
    monkeypatch.setenv("SAM3D_QUEUES", "bulk")
    assert cli.main(["worker", "--backend", "inflate"]) == 0
    assert seen["queues"] == ("bulk",)
    assert cli.main(["worker", "--backend", "inflate", "--queues", "interactive"]) == 0
    assert seen["queues"] == ("interactive",)
    monkeypatch.setenv("SAM3D_QUEUES", "nope")
    assert cli.main(["worker", "--backend", "inflate"]) == 2


def test_every_setting_has_a_line_in_the_generated_reference():
    from dataclasses import fields

    from jobs.settings import MEANINGS, REFERENCE_FILE, Settings, reference_section

    names = {f.name for f in fields(Settings)}
    assert names == set(MEANINGS), "a setting without its one line (jobs/settings.MEANINGS)"
    assert all(MEANINGS.values())
    text = (Path(__file__).resolve().parent.parent / REFERENCE_FILE).read_text(encoding="utf-8")
    assert reference_section() in text, f"{REFERENCE_FILE} is stale: run `python -m jobs.settings`"
    for name in names:
        assert f"`SAM3D_{name.upper()}`" in text
