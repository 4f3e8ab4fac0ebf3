"""The rollout-controller manifests in deploy/ against the daemon that serves them.

deploy/argo/analysis-template.yaml (an Argo Rollouts AnalysisTemplate on GET .../canary) and
deploy/flagger/canary.yaml (a Flagger Canary whose webhooks are canaryd's gates) are parsed, their
conditions are checked against canaryd's analysis states, and the requests they make are sent to a
real daemon: each must reach the route it means (not the API's "no such route").
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sdk_harness import REPO_ROOT

ARGO = REPO_ROOT / "deploy" / "argo" / "analysis-template.yaml"
FLAGGER = REPO_ROOT / "deploy" / "flagger" / "canary.yaml"

# canaryd's analysis states (canaryd_engine::judge::State::ALL).
STATES = {"insufficient_data", "healthy", "marginal", "failing", "promoted", "rolled_back"}

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), f"{path}: not a mapping"
    return document


def request(daemon: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of a request to the daemon's API listener."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{daemon.http}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=5.0) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def states_named(condition: str) -> set[str]:
    """The state names an Argo condition compares `result.state` with."""
    named = set(re.findall(r'result\.state\s*==\s*"([^"]*)"', condition))
    assert named, f"no `result.state == \"...\"` in {condition!r}"
    return named


def test_argo_template_tells_every_state_apart() -> None:
    template = load(ARGO)
    assert template["apiVersion"] == "argoproj.io/v1alpha1"
    assert template["kind"] == "AnalysisTemplate"
    (metric,) = template["spec"]["metrics"]
    success = states_named(metric["successCondition"])
    failure = states_named(metric["failureCondition"])
    assert success == {"healthy", "promoted"}
    assert failure == {"failing", "rolled_back"}
    # Neither condition holds for these: Argo calls the measurement Inconclusive, not Failed.
    assert STATES - success - failure == {"insufficient_data", "marginal"}
    # Healthy succeeds only when the promotion chain does not hold the version; promoted always.
    assert re.fullmatch(
        r'\(result\.state == "healthy" && result\.blocked_by == nil\) \|\| result\.state == "promoted"',
        metric["successCondition"],
    )
    assert metric["failureLimit"] == 0
    assert metric["inconclusiveLimit"] > 0
    web = metric["provider"]["web"]
    # No jsonPath: the whole canary view is `result`, so that conditions read its fields.
    assert "jsonPath" not in web
    assert web.get("method", "GET") == "GET"
    declared = {arg["name"] for arg in template["spec"]["args"]}
    used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", web["url"]))
    assert used <= declared, f"undeclared args {used - declared}"
    assert re.fullmatch(r"\{\{args\.canaryd-url\}\}/api/v1/apps/\{\{args\.app\}\}/canary\?env=\{\{args\.env\}\}", web["url"])


def test_argo_template_url_is_the_canary_route(canaryd: Any, token: str) -> None:
    template = load(ARGO)
    (metric,) = template["spec"]["metrics"]
    args = {"canaryd-url": "", "app": f"argo-{token}", "env": "prod"}
    url = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda m: args[m.group(1)], metric["provider"]["web"]["url"])
    status, body = request(canaryd, "GET", url)
    # An app canaryd has not seen: the canary route's own 404, naming the app.
    assert status == 404, body
    assert f"argo-{token}" in body["error"], body


def webhooks_by_type(canary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hooks = canary["spec"]["analysis"]["webhooks"]
    by_type = {hook["type"]: hook for hook in hooks}
    assert len(by_type) == len(hooks), "one webhook per type"
    return by_type


def test_flagger_canary_uses_both_gates() -> None:
    canary = load(FLAGGER)
    assert canary["apiVersion"] == "flagger.app/v1beta1"
    assert canary["kind"] == "Canary"
    hooks = webhooks_by_type(canary)
    assert set(hooks) == {"pre-rollout", "rollout", "confirm-promotion", "rollback"}
    for kind in ("pre-rollout", "rollout", "confirm-promotion"):
        assert urlsplit(hooks[kind]["url"]).path == "/api/v1/gates/flagger", kind
        assert hooks[kind]["metadata"]["hook"] == kind
    assert urlsplit(hooks["rollback"]["url"]).path == "/api/v1/gates/flagger/rollback"


def test_flagger_webhooks_reach_the_gates(canaryd: Any, token: str) -> None:
    canary = load(FLAGGER)
    name = f"{canary['metadata']['name']}-{token}"
    namespace = canary["metadata"]["namespace"]
    # What Flagger answers for an app canaryd has not seen: nothing to judge before traffic, no
    # evidence after it, nothing to promote, and no reason to roll back.
    expected = {"pre-rollout": 200, "rollout": 412, "confirm-promotion": 412, "rollback": 409}
    for kind, hook in webhooks_by_type(canary).items():
        payload = {
            "name": name,
            "namespace": namespace,
            "phase": "Progressing",
            "checksum": "6d4b8f",
            "metadata": hook.get("metadata") or {},
        }
        status, body = request(canaryd, "POST", urlsplit(hook["url"]).path, payload)
        assert status == expected[kind], f"{kind}: {status} {body}"
        assert (body["app"], body["env"]) == (name, namespace), body
