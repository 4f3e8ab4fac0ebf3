"""deploy/kubernetes: the base, the base with each optional component, and the monitoring
overlay (the base with all of them), rendered by `kubectl kustomize`. Kubernetes' own kinds are validated offline against
the Kubernetes 1.32 schemas (kubernetes-validate, strict: no unknown fields); the Prometheus
Operator's ServiceMonitor and PrometheusRule against that operator's published models
(cloudcoil's, from PyPI), which must take every field as given. The Grafana dashboard is a
ConfigMap the sidecar picks up. (Which metric names the dashboard and the alerts may query is
checked against a real daemon's /metrics by tests/monitoring.rs.) The base is then held to the
daemon and the image need: the Services' ports are the ones canaryd.toml listens on, the probes
ask /healthz and /readyz on the API port, the data dir is on the volume claim, the config file is
mounted where the container's args read it, the pod runs as the image's non-root user, and the
Flagger and Argo manifests' URLs name the Service this base creates. No cluster is needed (none
is reachable where the tests run); without kubectl the test says so and skips.
"""

from __future__ import annotations

import shutil
import subprocess
import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sdk_harness import REPO_ROOT, start_canaryd, stop_canaryd

BASE = REPO_ROOT / "deploy" / "kubernetes" / "base"
KUBERNETES_VERSION = "1.32.0"


MONITORING = REPO_ROOT / "deploy" / "kubernetes" / "overlays" / "monitoring"
REPLICAS = REPO_ROOT / "deploy" / "kubernetes" / "overlays" / "replicas"


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render deploy/kubernetes with kustomize")
    text = subprocess.run(
        [kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(BASE)


def one(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The resource of `kind` named `name`, or generated from it (`name-<hash>`)."""
    found = [
        d
        for d in documents
        if d["kind"] == kind
        and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"one {kind} {name}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def test_every_resource_is_valid_for_kubernetes_1_32(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == ["ConfigMap", "Namespace", "Service", "Service", "ServiceAccount", "StatefulSet"]
    for document in rendered:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "canaryd", document["metadata"]


def test_the_pod_serves_what_the_services_and_probes_expect(rendered: list[dict[str, Any]]) -> None:
    config_text = (BASE / "canaryd.toml").read_text(encoding="utf-8")
    # A flat file of `key = "text"` lines (tomllib needs Python 3.11; the tests run on 3.10).
    config = dict(re.findall(r'^(\w+) = "([^"]*)"$', config_text, re.MULTILINE))
    config_map = one(rendered, "ConfigMap", "canaryd-config")
    assert config_map["data"]["canaryd.toml"] == config_text

    statefulset = one(rendered, "StatefulSet", "canaryd")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "otlp-grpc": port_of(config["otlp_grpc_addr"]),
        "otlp-http": port_of(config["otlp_http_addr"]),
        "http": port_of(config["http_addr"]),
    }
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe

    # The config file is mounted where the args read it, from the generated ConfigMap.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_flag = container["args"][container["args"].index("--config") + 1]
    assert Path(config_flag).parent == Path(mounts["config"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    # The data dir lives on the claim.
    assert mounts["data"] == config["data_dir"]
    claims = [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]]
    assert claims == ["data"]

    # As the image's user, without privileges, with the API token from the Secret.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "--uid 10001" in dockerfile
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CANARYD_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "canaryd-tokens"

    selector = statefulset["spec"]["selector"]["matchLabels"]
    service = one(rendered, "Service", "canaryd")
    headless = one(rendered, "Service", "canaryd-replicas")
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (service, headless):
        assert svc["spec"]["selector"] == selector
        for port in svc["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"], port
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
    # Each replica finds the others through the headless Service, on their API port.
    peer_host, peer_port = config["cluster_peers"].rsplit(":", 1)
    assert peer_host == headless["metadata"]["name"] and int(peer_port) == ports["http"]


def test_the_replicas_overlay_runs_three_that_find_each_other() -> None:
    documents = render(REPLICAS)
    validate_all(documents)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted([d["kind"] for d in render(BASE)] + ["PodDisruptionBudget"])
    statefulset = one(documents, "StatefulSet", "canaryd")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    budget = one(documents, "PodDisruptionBudget", "canaryd")
    assert budget["spec"]["selector"] == statefulset["spec"]["selector"]
    assert budget["spec"]["maxUnavailable"] == 1
    for document in documents:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "canaryd", document["metadata"]


def test_the_rollout_controllers_point_at_this_service(rendered: list[dict[str, Any]]) -> None:
    service = one(rendered, "Service", "canaryd")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:8080"
    for manifest in ("flagger/canary.yaml", "argo/analysis-template.yaml"):
        text = (REPO_ROOT / "deploy" / manifest).read_text(encoding="utf-8")
        assert f"http://{host}" in text, f"{manifest} does not call {host}"


def validate_all(documents: list[dict[str, Any]]) -> None:
    """Kubernetes' kinds against its 1.32 schemas, the Prometheus Operator's against its models."""
    from cloudcoil.models.prometheus_operator import v1 as operator

    models = {"ServiceMonitor": operator.ServiceMonitor, "PrometheusRule": operator.PrometheusRule}
    for document in documents:
        model = models.get(document["kind"])
        if model is None:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            continue
        parsed = model.model_validate(document)
        # The models ignore what they do not know: a field they dropped is one the operator
        # would not know either.
        assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == document


MONITORING_COMPONENTS = {
    "servicemonitor": ["ServiceMonitor"],
    "prometheusrule": ["PrometheusRule"],
    "grafana-dashboard": ["ConfigMap"],
}
COMPONENTS = {**MONITORING_COMPONENTS, "httproute": ["ClusterRole", "RoleBinding"]}


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_each_component_alone_renders_valid_resources(component: str, tmp_path: Path) -> None:
    components = REPO_ROOT / "deploy" / "kubernetes" / "components"
    assert sorted(p.name for p in components.iterdir()) == sorted(COMPONENTS)
    # kustomize takes relative paths; a base and components outside the folder are fine.
    base, extra = (os.path.relpath(p, tmp_path) for p in (BASE, components / component))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {extra}\n",
        encoding="utf-8",
    )
    documents = render(tmp_path)
    base_kinds = [d["kind"] for d in render(BASE)]
    assert sorted(d["kind"] for d in documents) == sorted(base_kinds + COMPONENTS[component])
    validate_all(documents)


def test_the_httproute_component_grants_the_lever_exactly_what_it_does(tmp_path: Path) -> None:
    """Issue 19, part 3: the RBAC the httproute lever needs, and no more: get and patch (server-side
    apply) on HTTPRoutes, bound per namespace to the ServiceAccount the pod runs as, which now gets
    its token; the route setting and the API server's outbound allowance are settings the daemon
    takes."""
    component = REPO_ROOT / "deploy" / "kubernetes" / "components" / "httproute"
    base, extra = (os.path.relpath(p, tmp_path) for p in (BASE, component))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {extra}\n",
        encoding="utf-8",
    )
    documents = render(tmp_path)
    role = one(documents, "ClusterRole", "canaryd-httproute-lever")
    assert role["rules"] == [
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": ["get", "patch"]}
    ]
    assert not [d for d in documents if d["kind"] == "ClusterRoleBinding"], "bound per namespace only"
    binding = one(documents, "RoleBinding", "canaryd-httproute-lever")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "canaryd-httproute-lever",
    }
    pod = one(documents, "StatefulSet", "canaryd")["spec"]["template"]["spec"]
    account = one(documents, "ServiceAccount", pod["serviceAccountName"])
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]
    assert account["automountServiceAccountToken"] is True
    assert pod.get("automountServiceAccountToken", True) is True
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The settings as given are ones the daemon starts with.
    daemon = start_canaryd(
        tmp_path,
        ["--httproutes", env["CANARYD_HTTPROUTES"], "--outbound-allow", env["CANARYD_OUTBOUND_ALLOW"]],
    )
    try:
        namespace, route = env["CANARYD_HTTPROUTES"].split("=", 1)[1].split("@", 1)[0].split("/")
        assert binding["metadata"]["namespace"] == namespace, "the binding is in the route's namespace"
    finally:
        stop_canaryd(daemon)


def test_the_monitoring_overlay_adds_valid_operator_resources_and_a_dashboard() -> None:
    documents = render(MONITORING)
    base_kinds = sorted(d["kind"] for d in render(BASE))
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted(base_kinds + [k for ks in MONITORING_COMPONENTS.values() for k in ks])
    validate_all(documents)

    # The ServiceMonitor scrapes the API Service's metrics port, and only that Service.
    monitor = one(documents, "ServiceMonitor", "canaryd")
    services = [d for d in documents if d["kind"] == "Service"]
    selected = [
        s["metadata"]["name"]
        for s in services
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
    ]
    assert selected == ["canaryd"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in one(documents, "Service", "canaryd")["spec"]["ports"]}

    rule = one(documents, "PrometheusRule", "canaryd")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "CanarydDown",
        "CanarydOutboxBacklogGrowing",
        "CanarydWebhookDeliveriesFailing",
        "CanarydSeriesDroppedAtCap",
        "CanarydCanaryFailed",
    } <= alerts

    dashboard_map = one(documents, "ConfigMap", "canaryd-grafana-dashboard")
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = dashboard_map["data"].values()
    dashboard = json.loads(text)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("ingest", "state", "evidence", "outbox", "deliveries"):
        assert topic in titles, f"no panel on {topic}: {titles}"
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
