"""deploy/compose: canaryd on a laptop (collector, canaryd, HAProxy, the demo shop), held together
without a Docker engine (none runs where the tests run). What can be run is run for real: the
demo shop (deploy/compose/demo/app.py) with the OpenTelemetry SDK against a real canaryd, the
HAProxy configuration through `haproxy -c`, canaryd with the compose file's settings and the
subscription its `subscribe` service creates. The rest is checked to fit together: every file a
service builds from or mounts exists, and every address one service uses is where another listens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from sdk_harness import REPO_ROOT, Canaryd, eventually, find_app, start_canaryd, stop_canaryd

COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
DEMO = COMPOSE_DIR / "demo" / "app.py"
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict), COMPOSE
    return document


def services() -> dict[str, Any]:
    return compose()["services"]


def dockerfile_env() -> dict[str, str]:
    """The ENV the image sets (one ENV instruction, continued over lines)."""
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    (env,) = re.findall(r"^ENV (.*)$", text, re.MULTILINE)
    return dict(pair.split("=", 1) for pair in env.split())


def resolved(value: str) -> str:
    """A compose value with `${VAR:-default}` read as its default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def resource_attributes(service: dict[str, Any]) -> dict[str, str]:
    text = service["environment"]["OTEL_RESOURCE_ATTRIBUTES"]
    return dict(pair.split("=", 1) for pair in text.split(","))


def haproxy_servers() -> dict[str, str]:
    """HAProxy's servers in the shop backend: name -> address."""
    text = (COMPOSE_DIR / "haproxy.cfg").read_text(encoding="utf-8")
    backend = text.split("backend shop", 1)[1]
    return dict(re.findall(r"^\s*server (\S+) (\S+)", backend, re.MULTILINE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_built_or_mounted_file_exists() -> None:
    for name, service in services().items():
        build = service.get("build")
        if build is not None:
            context = COMPOSE_DIR / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {context / dockerfile}"
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), f"{name}: pin an image tag"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).is_file(), f"{name}: mounts missing {source}"
            else:
                assert source in compose().get("volumes", {}), f"{name}: undeclared volume {source}"
    # canaryd is built from the repository's own Dockerfile, the one tests/image.rs holds to README.
    assert (COMPOSE_DIR / services()["canaryd"]["build"]["context"]).resolve() == REPO_ROOT


def test_every_address_is_where_a_service_listens() -> None:
    every = services()
    image_env = dockerfile_env()
    collector = yaml.safe_load((COMPOSE_DIR / "collector.yaml").read_text(encoding="utf-8"))
    # The collector sends to canaryd's OTLP gRPC port, as the image sets it.
    target = collector["exporters"]["otlp/canaryd"]["endpoint"]
    assert target == "canaryd:" + image_env["CANARYD_OTLP_GRPC_ADDR"].rsplit(":", 1)[1]
    # The shop sends to the collector's OTLP/HTTP receiver.
    http_port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    shops = {name: s for name, s in every.items() if name.startswith("shop-")}
    assert set(shops) == {"shop-stable", "shop-canary"}
    for name, shop in shops.items():
        assert shop["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://collector:{http_port}", name
    # HAProxy's two servers are the two shops, on the port they serve.
    servers = haproxy_servers()
    assert servers == {
        "stable": f"shop-stable:{shops['shop-stable']['environment']['PORT']}",
        "canary": f"shop-canary:{shops['shop-canary']['environment']['PORT']}",
    }
    # canaryd's haproxy action names those servers for the shops' env and app.
    stable_attrs, canary_attrs = (resource_attributes(shops[n]) for n in ("shop-stable", "shop-canary"))
    env = stable_attrs["deployment.environment.name"]
    assert canary_attrs["deployment.environment.name"] == env
    assert stable_attrs["service.version"] != canary_attrs["service.version"]
    app = shops["shop-stable"]["environment"]["OTEL_SERVICE_NAME"]
    assert every["canaryd"]["environment"]["CANARYD_HAPROXY_SERVERS"] == f"{env}/{app}/*=shop/canary+stable"
    # The subscription reaches HAProxy's runtime API, through a name canaryd is told to allow.
    text = (COMPOSE_DIR / "haproxy.cfg").read_text(encoding="utf-8")
    (admin_port,) = re.findall(r"stats socket ipv4@0\.0\.0\.0:(\d+) level admin", text)
    body = json.loads(every["subscribe"]["command"][-2])
    assert body["url"] == f"tcp://haproxy:{admin_port}"
    assert every["canaryd"]["environment"]["CANARYD_OUTBOUND_ALLOW"] == "haproxy"
    assert every["subscribe"]["command"][-1] == "http://canaryd:" + image_env["CANARYD_HTTP_ADDR"].rsplit(":", 1)[1] + "/api/v1/subscriptions"
    # The traffic client goes through HAProxy's frontend.
    (front,) = re.findall(r"^\s*bind :(\d+)$", text, re.MULTILINE)
    assert every["traffic"]["command"][1] == f"http://haproxy:{front}"


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)")
def test_haproxy_takes_the_configuration() -> None:
    result = subprocess.run(
        [HAPROXY, "-c", "-f", str(COMPOSE_DIR / "haproxy.cfg")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def compose_canaryd(tmp_path: Path) -> Iterator[Canaryd]:
    """canaryd with the compose file's settings (addresses on loopback instead of the image's)."""
    settings = services()["canaryd"]["environment"]
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update({k: resolved(v) for k, v in settings.items()})
    try:
        daemon = start_canaryd(tmp_path)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield daemon
    finally:
        stop_canaryd(daemon)


def test_canaryd_takes_the_settings_and_the_subscription(compose_canaryd: Canaryd) -> None:
    every = services()
    command = every["subscribe"]["command"]
    headers = [resolved(command[i + 1]) for i, arg in enumerate(command) if arg == "-H"]
    request = urllib.request.Request(
        f"http://{compose_canaryd.http}/api/v1/subscriptions",
        data=command[-2].encode(),
        method="POST",
        headers=dict(h.split(": ", 1) for h in headers),
    )
    with _OPENER.open(request, timeout=10) as response:
        assert response.status == 201
        created = json.loads(response.read())
    assert created["id"]
    # Without the token the same request is refused: the compose file's token is the one in force.
    bare = urllib.request.Request(request.full_url, data=command[-2].encode(), method="POST",
                                  headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        _OPENER.open(bare, timeout=10)
    assert refused.value.code == 401


def test_the_demo_shop_reports_every_request_to_canaryd(canaryd: Canaryd, token: str) -> None:
    """The demo service as the canary runs it (half its requests failing), traced by the SDK into
    a real canaryd: every request it answered is counted, and every failure as an error."""
    port = free_port()
    app = f"shop-{token}"
    env = dict(
        os.environ,
        OTEL_SERVICE_NAME=app,
        OTEL_RESOURCE_ATTRIBUTES="service.version=1.1.0,deployment.environment.name=demo",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{canaryd.otlp_http}",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        PORT=str(port),
        FAULT_RATE="0.5",
    )
    shop = subprocess.Popen([sys.executable, str(DEMO)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        answers: dict[int, int] = {}
        sent = 0
        while sent < 40:
            assert shop.poll() is None, shop.stdout.read().decode() if shop.stdout else ""
            method, path = ("POST", "/api/checkout") if sent % 4 == 3 else ("GET", "/api/items")
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                             data=b"{}" if method == "POST" else None)
            try:
                with _OPENER.open(request, timeout=5) as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as error:
                status, body = error.code, error.read()
            except OSError:
                # Not listening yet.
                assert time.monotonic() < deadline, "the demo shop never answered"
                time.sleep(0.1)
                continue
            assert body == b"1.1.0\n", body
            answers[status] = answers.get(status, 0) + 1
            sent += 1
        assert set(answers) <= {200, 500} and answers.get(500), answers

        def check(apps: dict[str, Any]) -> str | None:
            entry = find_app(apps, app, "demo")
            if entry is None:
                return "not seen yet"
            versions = {v["version"]: v for v in entry["versions"]}
            seen = versions.get("1.1.0", {})
            got = (seen.get("requests"), seen.get("errors"))
            return None if got == (40, answers[500]) else f"(requests, errors) = {got}"

        eventually(canaryd, f"the demo shop {app} in canaryd", lambda: canaryd.apps(env="demo"), check)
    finally:
        shop.terminate()
        shop.wait(timeout=10)


def test_the_traffic_client_reports_what_it_gets(canaryd: Canaryd, token: str) -> None:
    """The compose file's traffic client against a demo shop: a line per 100 answers, counted by
    status and version."""
    port = free_port()
    env = dict(
        os.environ,
        OTEL_SERVICE_NAME=f"shop-{token}",
        OTEL_RESOURCE_ATTRIBUTES="service.version=1.0.0,deployment.environment.name=demo",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{canaryd.otlp_http}",
        PORT=str(port),
    )
    shop = subprocess.Popen([sys.executable, str(DEMO)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = subprocess.Popen(
        [sys.executable, str(DEMO), "traffic", f"http://127.0.0.1:{port}", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert client.stdout is not None
        # Until the shop listens the client counts its requests as unreachable; wait for a line of
        # answers only.
        deadline = time.monotonic() + 60
        line = ""
        while "unreachable" in line or not line:
            assert time.monotonic() < deadline, f"no line of answers; last: {line!r}"
            line = client.stdout.readline()
            assert line, "the traffic client exited"
        assert re.fullmatch(r"\d+00 requests: \{'200 1\.0\.0': 100\}", line.strip()), line
    finally:
        for process in (client, shop):
            process.terminate()
            process.wait(timeout=10)
