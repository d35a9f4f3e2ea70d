"""The Kubernetes deployment (k8s/): every overlay renders, validates against the Kubernetes schemas, passes
a checkov scan (with the Dockerfile), and agrees with the service's real configuration — settings, CLI
roles, ports, feedback stream keys, metric names. No cluster needed: `kubectl kustomize` renders (skipped
without kubectl), and checkov runs from its own virtualenv, .venv-checkov (`make checkov-venv`, run here on
first use). The Dockerfile's agreement with the Makefile is tests/unit/test_k8s_image.py.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml

import personalize
from personalize.feedback.stream import FeedbackStream, StreamConfig
from personalize.routing.announce import DRAIN_NOTICE_S
from personalize_service.cli import commands as cli
from personalize_service.cli import settings
from personalize_service.server.limits import USER_ID_METADATA_KEY
from personalize_service.server.metrics import ServiceMetrics, TrainerMetrics
from personalize_service.server.router import RouterMetrics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "gpu", "envoy")
NAMESPACE = "personalize"
VERSION = personalize.__version__
APP_IMAGE = {"dev": f"personalize:{VERSION}", "envoy": f"personalize:{VERSION}", "gpu": f"personalize:{VERSION}-cuda"}
USER = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
APP_UID = int(USER[1]) if USER else -1
"""The image's non-root user (the Dockerfile's `USER`): pods run as it."""

KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
"""The oldest release the manifests need (preStop `sleep` action) and the pinned recent one."""
CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "test_trainers_scale_on_every_feedback_stream",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "test_trainers_scale_on_every_feedback_stream",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "test_service_monitor_scrapes_every_metrics_port",
}
"""Kinds of third-party CRDs, not in kubernetes-validate's core schemas; vendoring their schemas would tie the
repo to one operator release, so the named tests check the fields these manifests rely on instead."""

NOT_SETTINGS = {
    "PERSONALIZE_S3_ACCESS_KEY": "personalize/adapters/store/s3.py",
    "PERSONALIZE_S3_SECRET_KEY": "personalize/adapters/store/s3.py",
}
"""PERSONALIZE_* variables read outside the settings table (credentials), and the file reading each."""
ROLES = {
    ("StatefulSet", "worker"): "worker",
    ("Deployment", "router"): "router",
    ("Deployment", "trainer"): "trainer",
    ("Deployment", "gateway"): "gateway",
}
"""The workloads running `personalize serve --role ROLE`."""
FRONT_DOORS = {"router", "envoy", "gateway"}
"""Components reachable from outside the namespace (their gRPC port only)."""
OUTSIDE_PEERS = {"monitoring": {"metrics"}, "keda": {"redis"}}
"""Namespaces let in from outside (Prometheus scrapes; KEDA reads the feedback streams) and their ports."""
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
    r"Max retries exceeded|ConnectTimeout|ProxyError|No route to host|Could not fetch URL|"
    r"from versions: none\)"
)
"""pip's output when the package index cannot be reached."""


# ---- rendering and lookups ------------------------------------------------------------------------------


@functools.cache
def rendered_text(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed, so k8s/overlays cannot be rendered; CI has it")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{out.stderr}"
    return out.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"))


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def label(workload: dict[str, Any]) -> str:
    return f"{workload['kind']}/{workload['metadata']['name']}"


def is_app(container: dict[str, Any]) -> bool:
    """Whether the container runs our image (`personalize:TAG`, any registry)."""
    return bool(container["image"].rsplit("/", 1)[-1].split(":")[0] == "personalize")


def app_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in workloads(objects):
        for container in pod(workload)["containers"]:
            if is_app(container):
                yield workload, container


def env_of(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then `env` in order
    (None: a value from a Secret or the downward API)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"{container['name']}: only ConfigMaps are imported whole"
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = None if "valueFrom" in var else var.get("value", "")
    return env


def value_of(env: dict[str, str | None], key: str) -> Any:
    """The value a setting takes in `env` (its default when unset)."""
    setting = settings.BY_KEY[key]
    raw = env.get(setting.env)
    return setting.parse(raw) if raw else setting.default


def role_of(workload: dict[str, Any]) -> str:
    return ROLES[workload["kind"], workload["metadata"]["name"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def quantity(text: str | int) -> int:
    """Bytes of a Kubernetes quantity (`9Gi`, `512Mi`, `1000`)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "": 1}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G)?", str(text))
    assert match, f"not a quantity: {text!r}"
    return int(match[1]) * units[match[2] or ""]


def network_error(output: str) -> bool:
    return bool(NETWORK_ERRORS.search(output))


# ---- rendering, schemas, static scan ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_one_namespace(overlay: str) -> None:
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "NetworkPolicy", "ScaledObject"} <= kinds
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']}"
    assert [o["metadata"]["name"] for o in find(objects, "Namespace")] == [NAMESPACE]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    """`kubernetes-validate --strict`: unknown fields are errors, so a typo cannot be silently dropped."""
    errors = []
    for o in render(overlay):
        if (o["apiVersion"], o["kind"]) in CUSTOM_RESOURCES:
            continue  # a CRD: see CUSTOM_RESOURCES
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_an_unknown_field() -> None:
    worker = one(render("dev"), "StatefulSet", "worker")
    typo = {**worker, "spec": {**worker["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.fixture(scope="session")
def checkov() -> Path:
    """checkov in .venv-checkov, installed by `make checkov-venv` when missing (~1 min)."""
    binary = REPO / ".venv-checkov" / "bin" / "checkov"
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed, so .venv-checkov cannot be created (`make checkov-venv`)")
    out = subprocess.run([make, "-s", "checkov-venv"], cwd=REPO, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        output = out.stdout + out.stderr
        if network_error(output):
            pytest.skip(f"checkov cannot be installed: the package index is unreachable\n{output[-2000:]}")
        pytest.fail(f"`make checkov-venv` failed:\n{output[-4000:]}")
    return binary


def test_checkov_finds_nothing(checkov: Path, tmp_path: Path) -> None:
    """One scan of every rendered overlay and of the Dockerfile."""
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(rendered_text(overlay))
    shutil.copy(REPO / "Dockerfile", tmp_path / "Dockerfile")
    out = subprocess.run(
        [
            str(checkov),
            "--directory",
            str(tmp_path),
            "--config-file",
            str(K8S / ".checkov.yaml"),
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.stdout.strip(), f"checkov printed nothing (exit {out.returncode}):\n{out.stderr[-4000:]}"
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]  # one dict when one framework ran
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    results = [r["results"] for r in reports]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for r in results
        for c in r["failed_checks"]
    ]
    assert not failed, "checkov found:\n" + "\n".join(failed)
    unexplained = [
        f"{c['check_id']} {c['resource']}"
        for r in results
        for c in r.get("skipped_checks", [])
        if not (c["check_result"].get("suppress_comment") or "").strip()
    ]
    assert not unexplained, f"checkov skips without a reason: {unexplained}"


def test_every_global_checkov_skip_has_a_comment() -> None:
    lines = (K8S / ".checkov.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*- CKV", line):
            assert lines[i - 1].strip().startswith("#"), f"k8s/.checkov.yaml: say why {line.strip()} is skipped"


# ---- agreement with the service's configuration ----------------------------------------------------------


def test_credentials_read_outside_the_settings_table_are_real() -> None:
    for name, path in NOT_SETTINGS.items():
        assert name in (REPO / path).read_text(), f"{path} no longer reads {name}"
        assert name not in {s.env for s in settings.SETTINGS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_names_only_real_settings_of_serve(overlay: str) -> None:
    objects = render(overlay)
    by_env = {s.env: s for s in settings.SETTINGS}
    configs = [
        dict(c["data"]) for c in find(objects, "ConfigMap") if c["metadata"]["name"].startswith("personalize-config")
    ]
    assert configs, "no personalize-config ConfigMap"
    sources = [("personalize-config", config) for config in configs]
    sources += [(f"{label(w)} {c['name']}", env_of(objects, c)) for w, c in app_containers(objects)]
    for where, env in sources:
        for name, value in env.items():
            if not name.startswith("PERSONALIZE_") or name in NOT_SETTINGS:
                continue
            assert name in by_env, f"{where}: {name} is no setting of service/cli/settings.py"
            setting = by_env[name]
            assert settings.SERVE in setting.commands, f"{where}: {name} does not apply to `personalize serve`"
            if value is not None and "$(" not in value:
                try:
                    setting.parse(value)
                except ValueError as exc:
                    pytest.fail(f"{where}: {name}={value!r} is {exc}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_references_are_defined_before_use(overlay: str) -> None:
    objects = render(overlay)
    for workload, container in app_containers(objects):
        defined = set(env_of(objects, {**container, "env": []}))
        for var in container.get("env", []):
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var.get("value", "")):
                assert ref in defined, f"{label(workload)}: {var['name']} uses $({ref}) before it is defined"
            defined.add(var["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_real_serve_roles(overlay: str) -> None:
    objects = render(overlay)
    parser = cli.build_parser()
    roles = {}
    for workload, container in app_containers(objects):
        assert "command" not in container, f"{label(workload)}: keep the image's `personalize` entrypoint"
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                args = parser.parse_args(container["args"])
            except SystemExit:
                pytest.fail(f"{label(workload)}: `personalize {' '.join(container['args'])}`: {err.getvalue()}")
        assert args.command == settings.SERVE
        roles[workload["kind"], workload["metadata"]["name"]] = args.role
    expected = {key: role for key, role in ROLES.items() if not (overlay == "envoy" and role == "router")}
    assert roles == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_are_the_configured_ports(overlay: str) -> None:
    objects = render(overlay)
    for workload, container in app_containers(objects):
        env = env_of(objects, container)
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if role_of(workload) == "trainer":
            metrics = value_of(env, "service.metrics_port")
            assert metrics and ports == {"metrics": metrics}, "the trainer serves only its metrics"
            continue
        if role_of(workload) == "gateway":  # HTTP only, /metrics on the same port
            assert ports == {"http": value_of(env, "http_port")}, label(workload)
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            continue
        grpc, metrics = value_of(env, "service.port"), value_of(env, "service.metrics_port")
        assert metrics, f"{label(workload)}: PERSONALIZE_METRICS_PORT is 0: metrics are off"
        assert ports == {"grpc": grpc, "metrics": metrics}, label(workload)
        assert value_of(env, "service.host") == "0.0.0.0", f"{label(workload)} listens on loopback only"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["grpc"]["port"] == grpc, f"{label(workload)} {probe}"
        assert "readinessProbe" in container and "livenessProbe" in container, label(workload)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_target_ports_their_pods_have(overlay: str) -> None:
    objects = render(overlay)
    for service in find(objects, "Service"):
        selected = [
            w
            for w in workloads(objects)
            if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for workload in selected:
            ports = {p.get("name"): p["containerPort"] for c in pod(workload)["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports or target in ports.values(), (
                    f"Service {service['metadata']['name']} port {port['name']}: {label(workload)} has no {target}"
                )
                assert ports.get(target, target) == port["port"], "a Service port differs from its container port"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_named_and_reached_by_their_pod(overlay: str) -> None:
    """The ring's node names are the StatefulSet pod names; routers dial the pod's headless DNS name."""
    objects = render(overlay)
    worker = one(objects, "StatefulSet", "worker")
    service = one(objects, "Service", worker["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], worker["spec"]["template"]["metadata"]["labels"])
    (container,) = pod(worker)["containers"]
    env = {var["name"]: var for var in container["env"]}
    for name, field in (("PERSONALIZE_NODE_ID", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == field
    advertise = settings.BY_KEY["service.advertise"].env
    assert env[advertise]["value"] == (
        f"$(PERSONALIZE_NODE_ID).{service['metadata']['name']}.$(POD_NAMESPACE)"
        f".svc.cluster.local:$({settings.BY_KEY['service.port'].env})"
    )
    for _, container in app_containers(objects):  # trainers' consumer names too
        node_id = next(v for v in container["env"] if v["name"] == "PERSONALIZE_NODE_ID")
        assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


SHARED_KEYS = ("model.path", "model.dtype", "lora.r_max", "feedback.partitions", "registry.url", "store_url")
"""Settings workers and trainers must agree on: the base's fingerprint hashes its weights in their dtype, an
adapter's rank is checked against r_max, and both sides hash users onto the same partitions and registry."""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_and_trainers_share_the_base_model(overlay: str) -> None:
    objects = render(overlay)
    envs = {role_of(w): env_of(objects, c) for w, c in app_containers(objects) if role_of(w) != "router"}
    for key in SHARED_KEYS:
        assert value_of(envs["worker"], key) == value_of(envs["trainer"], key), key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str) -> None:
    objects = render(overlay)
    for workload, container in app_containers(objects):
        if role_of(workload) == "trainer":
            continue
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = value_of(env_of(objects, container), "service.grace_s")
        needed = pause + DRAIN_NOTICE_S + grace + 5  # + stopping the server and the engine
        assert pod(workload)["terminationGracePeriodSeconds"] >= needed, label(workload)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_empty_dirs(overlay: str) -> None:
    objects = render(overlay)
    for workload, container in app_containers(objects):
        env = env_of(objects, container)
        volumes = {v["name"]: v for v in pod(workload)["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        for path in ("/tmp", value_of(env, "data_dir")):
            assert "emptyDir" in mounts.get(path, {}), f"{label(workload)}: {path} is not an emptyDir"
        if role_of(workload) == "worker":
            size = quantity(mounts[value_of(env, "data_dir")]["emptyDir"]["sizeLimit"])
            assert size >= value_of(env, "lora.disk_bytes"), "the data dir is smaller than the disk cache"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay: str) -> None:
    for workload in workloads(render(overlay)):
        spec, where = pod(workload), label(workload)
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: {kind}"
            if is_app(container):
                assert spec["securityContext"]["runAsUser"] == APP_UID, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_releases(overlay: str) -> None:
    for workload in workloads(render(overlay)):
        for container in pod(workload)["containers"]:
            image = container["image"]
            if is_app(container):
                assert image == APP_IMAGE[overlay], label(workload)
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{label(workload)}: {image} is not a pinned tag"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_in_the_gpu_overlay(overlay: str) -> None:
    objects = render(overlay)
    for workload, container in app_containers(objects):
        if role_of(workload) in ("router", "gateway"):
            continue
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        device = value_of(env_of(objects, container), "model.device")
        if overlay == "gpu":
            assert gpus == 1 and device.startswith("cuda"), label(workload)
            assert pod(workload)["tolerations"] and pod(workload)["nodeSelector"], label(workload)
        else:
            assert gpus == 0 and device == "cpu", label(workload)


# ---- custom resources, network policies, monitoring, Envoy ----------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainers_scale_on_every_feedback_stream(overlay: str) -> None:
    """KEDA's ScaledObject (a CRD, checked here): one redis-streams trigger per partition stream key."""
    objects = render(overlay)
    scaled = one(objects, "ScaledObject", "trainer")
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "triggers",
        "advanced",
        "fallback",
    }
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "trainer"}
    trainer = one(objects, "Deployment", "trainer")
    assert "replicas" not in trainer["spec"], "KEDA owns the trainers' replicas"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    env = env_of(objects, pod(trainer)["containers"][0])
    registry = urlsplit(value_of(env, "registry.url"))
    assert find(objects, "Service", registry.hostname), f"no Service {registry.hostname} for the registry URL"
    config = StreamConfig(partitions=value_of(env, "feedback.partitions"))
    stream = FeedbackStream(redis.Redis(), config)  # only names keys: never connects
    expected = {
        "address": f"{registry.hostname}.{NAMESPACE}.svc.cluster.local:{registry.port or 6379}",
        "databaseIndex": registry.path.strip("/") or "0",
        "consumerGroup": config.group,
    }
    streams = []
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis-streams"
        metadata = trigger["metadata"]
        assert {k: metadata[k] for k in expected} == expected
        assert "pendingEntriesCount" not in metadata, "pending entries miss a backlog no trainer has read"
        assert int(metadata["streamLength"]) > 0  # the lag: acknowledged events are deleted
        auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["spec"]["secretTargetRef"] == [
            {"parameter": "password", "name": "personalize-valkey", "key": "password"}
        ], "KEDA reads the streams with the Valkey password"
        streams.append(metadata["stream"])
    assert sorted(streams) == sorted(stream.stream_key(p) for p in range(config.partitions))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_every_metrics_port(overlay: str) -> None:
    """The Prometheus Operator's ServiceMonitor (a CRD, checked here)."""
    objects = render(overlay)
    monitor = one(objects, "ServiceMonitor", "personalize")
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selected = {
        s["metadata"]["name"]: s
        for s in find(objects, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
    }
    expected = {"worker", "trainer-metrics"} if overlay == "envoy" else {"worker", "router-metrics", "trainer-metrics"}
    assert set(selected) == expected
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        for service in selected.values():
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_front_door_is_reachable_from_outside(overlay: str) -> None:
    objects = render(overlay)
    policies = find(objects, "NetworkPolicy")
    assert any(
        p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
        for p in policies
    ), "no default-deny ingress policy"
    for workload in workloads(objects):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        component = labels.get("app.kubernetes.io/component", "")
        open_ports: set[str] = set()
        for policy in policies:
            if not selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
                continue
            for rule in policy["spec"].get("ingress", []):
                ports = {p["port"] for p in rule.get("ports", [])}
                assert ports, f"{policy['metadata']['name']}: a rule must name its ports"
                if "from" not in rule:
                    open_ports |= ports
                    continue
                for peer in rule["from"]:
                    assert "ipBlock" not in peer, f"{policy['metadata']['name']}: use the front door"
                    if "namespaceSelector" in peer:
                        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                        assert ports <= OUTSIDE_PEERS.get(namespace, set()), (
                            f"{label(workload)}: {namespace} may not reach ports {ports}"
                        )
        if component in FRONT_DOORS:
            assert open_ports == ({"http"} if component == "gateway" else {"grpc"}), label(workload)
        else:
            assert not open_ports, f"{label(workload)} is open to everyone on {open_ports}"


def _dashboard_names() -> tuple[set[str], dict[str, set[str]]]:
    """Names used in the dashboard's queries, and each real metric's sample names."""
    metrics = ServiceMetrics()
    RouterMetrics(metrics)
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    families = [*metrics.registry.collect(), *TrainerMetrics().registry.collect()]
    samples = {f.name: {f.name + s for s in suffixes[f.type]} for f in families}
    dashboard = json.loads((K8S / "base" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    return set(re.findall(r"\bpersonalize_[a-z0-9_]+", exprs)), samples


def test_grafana_dashboard_shows_every_metric_by_its_real_name() -> None:
    used, samples = _dashboard_names()
    real = set().union(*samples.values())
    assert used <= real, f"not metrics of the service: {used - real}"
    missing = [name for name, names in samples.items() if not names & used]
    assert not missing, f"metrics without a panel: {missing}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grafana_dashboard_ships_as_a_configmap(overlay: str) -> None:
    (config,) = [
        c for c in find(render(overlay), "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    (text,) = config["data"].values()
    assert json.loads(text) == json.loads((K8S / "base" / "grafana-dashboard.json").read_text())


def test_envoy_hashes_users_onto_the_workers() -> None:
    objects = render("envoy")
    (config_map,) = [c for c in find(objects, "ConfigMap") if c["metadata"]["name"].startswith("envoy-config")]
    config = yaml.safe_load(config_map["data"]["envoy.yaml"])
    (listener,) = config["static_resources"]["listeners"]
    (cluster,) = config["static_resources"]["clusters"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": USER_ID_METADATA_KEY}}]
    assert (cluster["type"], cluster["lb_policy"]) == ("STRICT_DNS", "RING_HASH")
    assert "grpc_health_check" in cluster["health_checks"][0]
    worker = one(objects, "StatefulSet", "worker")
    worker_port = value_of(env_of(objects, pod(worker)["containers"][0]), "service.port")
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {
        "address": f"{worker['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local",
        "port_value": worker_port,
    }
    envoy = one(objects, "Deployment", "envoy")
    ports = {p["name"]: p["containerPort"] for p in pod(envoy)["containers"][0]["ports"]}
    assert listener["address"]["socket_address"]["port_value"] == ports["grpc"]
    assert one(objects, "Service", "router")["spec"]["selector"]["app.kubernetes.io/component"] == "envoy"
