"""deploy/collector: the OpenTelemetry Collector tier in front of canaryd, held together without a
Collector binary (none can be installed where the tests run: it is built from Go modules, and no
Go module proxy is reachable). Every pipeline uses only components the file defines, every signal
goes through, the agent sends to the port the gateways receive on, and the gateways route by
service (one service, one canaryd replica) to canaryd's OTLP gRPC port: on Kubernetes through the
headless Service that deploy/kubernetes/base creates, elsewhere to a static list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdk_harness import REPO_ROOT

COLLECTOR = REPO_ROOT / "deploy" / "collector"
BASE = REPO_ROOT / "deploy" / "kubernetes" / "base"
CONFIGS = ["agent.yaml", "gateway-kubernetes.yaml", "gateway-static.yaml"]
GATEWAYS = ["gateway-kubernetes.yaml", "gateway-static.yaml"]


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), path
    return document


def canaryd_otlp_grpc_port() -> int:
    text = (BASE / "canaryd.toml").read_text(encoding="utf-8")
    (addr,) = re.findall(r'^otlp_grpc_addr = "([^"]*)"$', text, re.MULTILINE)
    return int(addr.rsplit(":", 1)[1])


# The tier's files, and the single collector of deploy/compose (held to the same rules).
PIPELINE_CONFIGS = [COLLECTOR / name for name in CONFIGS] + [REPO_ROOT / "deploy" / "compose" / "collector.yaml"]


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_pipeline_uses_defined_components_for_every_signal(path: Path) -> None:
    config = load(path)
    name = f"{path.parent.name}/{path.name}"
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    for signal, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config.get(kind, {}), f"{name}: {signal} uses undefined {component}"
        # The memory limiter must come first to shed load before anything else holds it.
        assert pipeline["processors"][0] == "memory_limiter", f"{name}: {signal}"
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")


def test_the_agent_sends_where_the_gateways_listen() -> None:
    agent = load(COLLECTOR / "agent.yaml")
    (exporter,) = agent["exporters"].values()
    port = int(exporter["endpoint"].rsplit(":", 1)[1])
    for name in GATEWAYS:
        grpc = load(COLLECTOR / name)["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        assert int(grpc.rsplit(":", 1)[1]) == port, name


@pytest.mark.parametrize("name", GATEWAYS)
def test_the_gateways_route_each_service_to_one_canaryd_replica(name: str) -> None:
    config = load(COLLECTOR / name)
    balancer = config["exporters"]["loadbalancing"]
    assert balancer["routing_key"] == "service"
    assert set(balancer["protocol"]) == {"otlp"}
    for signal, pipeline in config["service"]["pipelines"].items():
        assert pipeline["exporters"] == ["loadbalancing"], f"{name}: {signal}"
    (resolver,) = balancer["resolver"].items()
    port = canaryd_otlp_grpc_port()
    if resolver[0] == "k8s":
        headless = load(BASE / "service-headless.yaml")
        namespace = load(BASE / "kustomization.yaml")["namespace"]
        assert headless["spec"]["clusterIP"] == "None"
        assert resolver[1]["service"] == f"{headless['metadata']['name']}.{namespace}"
        assert resolver[1]["ports"] == [port]
        assert port in {p["port"] for p in headless["spec"]["ports"]}
    else:
        assert resolver[0] == "static"
        hostnames = resolver[1]["hostnames"]
        assert hostnames and all(h.endswith(f":{port}") for h in hostnames)


def test_the_gateways_permissions_are_valid_kubernetes_and_reach_canaryds_namespace() -> None:
    import kubernetes_validate

    documents = [
        d
        for d in yaml.safe_load_all((COLLECTOR / "gateway-rbac.yaml").read_text(encoding="utf-8"))
        if d
    ]
    namespace = load(BASE / "kustomization.yaml")["namespace"]
    for document in documents:
        kubernetes_validate.validate(document, "1.32.0", strict=True)
        assert document["metadata"]["namespace"] == namespace
    role = next(d for d in documents if d["kind"] == "Role")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "endpointslices" in resources
