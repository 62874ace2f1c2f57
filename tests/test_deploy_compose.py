"""docker-compose.yml, the Dockerfiles and .env.example, checked offline (no Docker engine
here): the compose spec's JSON schema, and what every service needs to start."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
CHECK_JSONSCHEMA = str(Path(sys.executable).parent / "check-jsonschema")
ONE_SHOT = {"minio-init"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec():
    result = subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_broken_file(tmp_path):
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["api"]["healthcheck"]["interval"] = ["not", "a", "duration"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


def test_every_long_running_service_has_a_healthcheck_and_waits_for_healthy_deps(compose):
    services = compose["services"]
    assert set(services) >= {
        "redis",
        "minio",
        "minio-init",
        "api",
        "worker-gpu",
        "worker-cpu",
        "flower",
    }
    for name, service in services.items():
        if name not in ONE_SHOT:
            test = service["healthcheck"]["test"]
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
            assert service.get("restart") == "unless-stopped", name
        for dep, condition in (service.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert condition["condition"] == expected, (name, dep)


def test_redis_persists_with_aof_everysec_and_never_evicts(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.startswith("redis-data:") for v in redis["volumes"])
    assert "redis-data" in compose["volumes"]


def test_gpu_worker_reserves_a_gpu_and_mounts_weights_read_only(compose):
    gpu = compose["services"]["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    mounts = {v.rsplit(":", 2)[-2]: v for v in gpu["volumes"]}
    assert mounts["/models/sam3d"].endswith(":ro") and mounts["/models/cache"].endswith(":ro")
    assert "--gpu" in gpu["command"]
    # Long enough to let warm shutdown finish the job in hand (SAM3D_JOB_TIME_LIMIT_S=900).
    minutes = int(re.fullmatch(r"(\d+)m", gpu["stop_grace_period"]).group(1))
    assert minutes * 60 >= 900


def test_profiles_keep_optional_services_off_by_default(compose):
    services = compose["services"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["flower"]["profiles"] == ["flower"]
    assert "profiles" not in services["api"] and "profiles" not in services["worker-gpu"]


def test_env_example_covers_every_variable_and_holds_no_secret(compose):
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert used <= set(example), used - set(example)
    assert "change-me" in example["MINIO_ROOT_PASSWORD"]
    assert example["SAM3D_API_KEYS"] == ""
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    tracked = subprocess.run(
        ["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert tracked == ""
    for service in ("api", "worker-gpu", "worker-cpu"):
        assert compose["services"][service]["env_file"] == ".env"


def test_signed_url_endpoint_is_configurable(compose):
    example = (ROOT / ".env.example").read_text()
    assert "SAM3D_S3_PUBLIC_ENDPOINT_URL=" in example
    assert "9000:9000" in compose["services"]["minio"]["ports"]


@pytest.mark.parametrize("name", ["api", "worker-cpu", "worker-gpu"])
def test_dockerfiles_are_pinned_and_run_as_non_root(name):
    text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert ":" in image and not image.endswith(":latest"), image
        assert re.search(r":\S*\d", image), image  # a version in the tag
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for path in re.findall(r"^COPY\s+(?!--from)(\S+)\s", text, re.M):
        assert (ROOT / path).exists(), path  # everything the build copies is in the repo


def test_the_api_is_published_only_through_the_buffering_proxy(compose):
    services = compose["services"]
    assert "ports" not in services["api"]  # gunicorn never faces a slow client directly
    proxy = services["proxy"]
    assert proxy["ports"] == ["8000:8080"]
    assert proxy["environment"] == {"SAM3D_API_UPSTREAM": "api:8000", "SAM3D_PROXY_PORT": "8080"}
    source, target, mode = proxy["volumes"][0].split(":")
    assert (target, mode) == ("/etc/nginx/templates", "ro")
    # The template tests/test_proxy.py runs with a real nginx.
    assert (ROOT / source / "sam3d.conf.template").is_file()
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
