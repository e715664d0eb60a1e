"""The Kubernetes manifests in k8s/ against the Kubernetes API schemas and the project itself.

Built-in kinds are validated offline by `kubernetes-validate` (the OpenAPI schemas it bundles,
strict: unknown fields are errors) for `KUBERNETES_VERSION`; the ServiceMonitor, a
prometheus-operator CRD it cannot know, by `servicemonitor_schema`. Then the manifests are
checked against one another (selectors, named ports, referenced objects) and against the code:
probe and Ingress paths are routes the app serves, env names are `Settings` fields with valid
values, container args parse with the `userstream` CLI, the HPA's metric is one the process
exports, and the gateway's grace period outlasts its drain (`server_shutdown_timeout_s`).
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

import sync.metrics  # noqa: F401  (registers the process's metrics)
from gateway.shutdown import server_shutdown_timeout_s
from tests.deploy.servicemonitor_schema import validate_service_monitor
from tests.deploy.sources import (
    K8S,
    duration_s,
    parse_cli,
    served_paths,
    settings_env_names,
    settings_from,
)

KUBERNETES_VERSION = "1.30"
"""The oldest Kubernetes the manifests are for (the preStop `sleep` action is on from 1.30)."""

KUSTOMIZATION = K8S / "kustomization.yaml"
STREAM_PATH = "/me/stream"

Resource = dict[str, Any]


def manifest_files() -> list[Path]:
    """Every manifest in k8s/, sorted by name (kustomization.yaml is not one)."""
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


def load(path: Path) -> list[Resource]:
    """The non-empty YAML documents of one file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def resources() -> list[Resource]:
    return [resource for path in manifest_files() for resource in load(path)]


def one(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    """The single resource of this kind (and name, if given); fails the test otherwise."""
    found = [
        r
        for r in resources
        if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(resources: list[Resource]) -> Iterator[tuple[str, Resource]]:
    """(kind/name, pod template spec) of every Deployment and Job."""
    for r in resources:
        if r["kind"] in ("Deployment", "Job"):
            yield f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector's matchLabels select `labels` (no matchExpressions are used)."""
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def gateway_deployment(resources: list[Resource]) -> Resource:
    """The Deployment running `userstream serve`."""
    return one(resources, "Deployment", "userstream-gateway")


def container_of(deployment: Resource) -> dict[str, Any]:
    """The one container of a workload's pods."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def configured_settings(resources: list[Resource]) -> dict[str, str]:
    """The environment every container gets: the ConfigMap's data and the Secret's
    stringData."""
    config = one(resources, "ConfigMap")["data"]
    secret = one(resources, "Secret")["stringData"]
    return {**config, **secret}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_for_the_kubernetes_api(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path.name} holds no resource"
    for resource in docs:
        if resource["apiVersion"] == "monitoring.coreos.com/v1":
            validate_service_monitor(resource, KUBERNETES_VERSION)
        else:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_exactly_the_manifest_files() -> None:
    listed = yaml.safe_load(KUSTOMIZATION.read_text())["resources"]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(listed) == [p.name for p in manifest_files()]


def test_kustomization_image_is_the_one_the_containers_use(resources: list[Resource]) -> None:
    names = {i["name"] for i in yaml.safe_load(KUSTOMIZATION.read_text())["images"]}
    for workload, pod in workloads(resources):
        for container in pod["spec"]["containers"]:
            assert container["image"] in names, workload


def test_settings_names_are_real_and_their_values_valid(resources: list[Resource]) -> None:
    env = configured_settings(resources)
    unknown = sorted(set(env) - settings_env_names())
    assert not unknown, f"no such setting in gateway.settings.Settings: {unknown}"
    settings = settings_from(env)  # raises on a value the settings refuse
    assert settings.database_url and settings.redis_url
    assert settings.jwt_secret is not None and settings.admin_token is not None


def test_container_args_parse_with_the_cli(resources: list[Resource]) -> None:
    roles = {
        workload: parse_cli(list(container["args"]))
        for workload, pod in workloads(resources)
        for container in pod["spec"]["containers"]
    }
    assert roles == {
        "Deployment/userstream-gateway": "serve",
        "Deployment/userstream-relay": "relay",
        "Job/userstream-migrate": "migrate",
    }
    for workload, pod in workloads(resources):
        for container in pod["spec"]["containers"]:
            assert "command" not in container, f"{workload}: keep the image's ENTRYPOINT"


def test_containers_take_their_environment_from_the_configmap_and_secret(
    resources: list[Resource],
) -> None:
    config = one(resources, "ConfigMap")["metadata"]["name"]
    secret = one(resources, "Secret")["metadata"]["name"]
    for workload, pod in workloads(resources):
        for container in pod["spec"]["containers"]:
            refs = [next(iter(source.items())) for source in container["envFrom"]]
            assert refs == [("configMapRef", {"name": config}), ("secretRef", {"name": secret})]
            assert "env" not in container, workload


def test_probes_use_routes_the_app_serves_on_named_ports(resources: list[Resource]) -> None:
    paths = served_paths()
    container = container_of(gateway_deployment(resources))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] in paths, f"{probe}: {http_get['path']} is not served"
        assert http_get["port"] in ports, f"{probe}: no container port {http_get['port']}"


def test_container_ports_match_the_configured_ports(resources: list[Resource]) -> None:
    settings = settings_from(configured_settings(resources))
    gateway = {
        p["name"]: p["containerPort"] for p in container_of(gateway_deployment(resources))["ports"]
    }
    assert gateway == {"http": settings.port, "metrics": settings.metrics_port}
    relay = container_of(one(resources, "Deployment", "userstream-relay"))
    assert {p["name"]: p["containerPort"] for p in relay["ports"]} == {
        "metrics": settings.metrics_port
    }
    assert settings.host == "0.0.0.0", "the relay's /metrics must listen beyond loopback"


def test_gateway_grace_period_outlasts_prestop_and_drain(resources: list[Resource]) -> None:
    """Kubernetes counts terminationGracePeriodSeconds from the start of preStop, then sends
    SIGTERM; the gateway then needs `server_shutdown_timeout_s` to close every stream and exit
    (gateway/shutdown.py). SIGKILL before that cuts streams without their `close`."""
    pod = gateway_deployment(resources)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s >= 1, "give endpoints time to drop the pod before SIGTERM"
    settings = settings_from(configured_settings(resources))
    needed_s = pre_stop_s + server_shutdown_timeout_s(settings)
    assert pod["terminationGracePeriodSeconds"] > needed_s


def test_pods_run_unprivileged_with_a_read_only_root(resources: list[Resource]) -> None:
    for workload, pod in workloads(resources):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, workload
        assert pod["spec"]["securityContext"]["runAsUser"] != 0, workload
        for container in pod["spec"]["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, workload
            assert context["allowPrivilegeEscalation"] is False, workload
            assert container["resources"]["requests"], workload
            assert container["resources"]["limits"]["memory"], workload


def test_relay_runs_two_replicas(resources: list[Resource]) -> None:
    assert one(resources, "Deployment", "userstream-relay")["spec"]["replicas"] == 2


def test_selectors_select_the_pods_of_their_workload(resources: list[Resource]) -> None:
    for deployment in (r for r in resources if r["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"], labels), deployment["metadata"]["name"]
    for service in (r for r in resources if r["kind"] == "Service"):
        pods = [
            pod
            for _, pod in workloads(resources)
            if selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
        ]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)}"
        names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)
    for pdb in (r for r in resources if r["kind"] == "PodDisruptionBudget"):
        matched = [
            w
            for w, pod in workloads(resources)
            if selects(pdb["spec"]["selector"], pod["metadata"]["labels"])
        ]
        assert len(matched) == 1 and matched[0].startswith("Deployment/"), matched


def test_hpa_scales_the_gateway_on_its_connections_gauge(resources: list[Resource]) -> None:
    hpa = one(resources, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "userstream-gateway")
    assert hpa["spec"]["minReplicas"] >= 2
    (pods_metric,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    exported = {family.name for family in REGISTRY.collect()}
    assert pods_metric["metric"]["name"] == "userstream_connections"
    assert pods_metric["metric"]["name"] in exported
    assert pods_metric["target"]["type"] == "AverageValue"


def test_service_monitor_scrapes_the_metrics_port_of_every_userstream_service(
    resources: list[Resource],
) -> None:
    monitor = one(resources, "ServiceMonitor")
    services = [
        s
        for s in resources
        if s["kind"] == "Service" and selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in services} == {"userstream-gateway", "userstream-relay"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert duration_s(endpoint["scrapeTimeout"]) <= duration_s(endpoint["interval"])
        for service in services:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_ingress_routes_the_stream_with_sse_settings(resources: list[Resource]) -> None:
    """ingress-nginx buffers responses and closes reads idle for 60 s unless told otherwise
    (ingress-nginx annotations proxy-buffering, proxy-read-timeout, proxy-send-timeout)."""
    ingress = one(resources, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-buffering"] == "off"
    keepalive_s = settings_from(configured_settings(resources)).keepalive_s
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[prefix + timeout]) >= 10 * keepalive_s, timeout
    service = one(resources, "Service", "userstream-gateway")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert {p["path"] for p in paths} == {STREAM_PATH}
    assert STREAM_PATH in served_paths()
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in port_names


def test_manifest_validation_rejects_a_misspelt_field(resources: list[Resource]) -> None:
    """The schema checks above are strict: an unknown field fails them."""
    deployment = gateway_deployment(resources)
    broken = {**deployment, "spec": {**deployment["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replicaz"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    monitor = one(resources, "ServiceMonitor")
    endpoint = {**monitor["spec"]["endpoints"][0], "intreval": "15s"}
    broken = {**monitor, "spec": {**monitor["spec"], "endpoints": [endpoint]}}
    with pytest.raises(Exception, match="intreval"):
        validate_service_monitor(broken, KUBERNETES_VERSION)
