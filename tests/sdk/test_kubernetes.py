"""deploy/kubernetes/base, rendered by `kubectl kustomize` and validated offline against the
Kubernetes 1.32 schemas (kubernetes-validate, strict: no unknown fields), then held to what the
daemon and the image need: the Services' ports are the ones canaryd.toml listens on, the probes
ask /healthz and /readyz on the API port, the data dir is on the volume claim, the config file is
mounted where the container's args read it, the pod runs as the image's non-root user, and the
Flagger and Argo manifests' URLs name the Service this base creates. No cluster is needed (none
is reachable where the tests run); without kubectl the test says so and skips.
"""

from __future__ import annotations

import shutil
import subprocess
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sdk_harness import REPO_ROOT

BASE = REPO_ROOT / "deploy" / "kubernetes" / "base"
KUBERNETES_VERSION = "1.32.0"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render deploy/kubernetes with kustomize")
    text = subprocess.run(
        [kubectl, "kustomize", str(BASE)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(text) if d]


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


def test_the_rollout_controllers_point_at_this_service(rendered: list[dict[str, Any]]) -> None:
    service = one(rendered, "Service", "canaryd")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:8080"
    for manifest in ("flagger/canary.yaml", "argo/analysis-template.yaml"):
        text = (REPO_ROOT / "deploy" / manifest).read_text(encoding="utf-8")
        assert f"http://{host}" in text, f"{manifest} does not call {host}"
