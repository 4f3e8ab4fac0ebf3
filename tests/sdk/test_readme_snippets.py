"""The README's code is run as written: the webhook signature check a receiver copies verifies the
Standard Webhooks reference vector (the one canaryd's own signing test reproduces), and refuses a
tampered body; and the "first hour" walkthrough runs block by block against the real daemon."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from sdk_harness import REPO_ROOT, Canaryd, canaryd_binary, eventually, find_app

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def snippet(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"one README python block with {containing!r}, found {len(found)}"
    return found[0]


def test_the_signature_check_in_the_readme_verifies_a_signed_delivery():
    scope: dict = {}
    exec(snippet("def verified"), scope)
    verified = scope["verified"]
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert verified(secret, headers, b'{"test": 2432232314}')
    assert not verified(secret, headers, b'{"test": 2432232315}')


# ---------------------------------------------------------------------------------------------
# "The first hour": the walkthrough, block by block, as a user would paste it.

WALKTHROUGH = "The first hour"
# Deadlines of the walkthrough's waits (wall time). The README promises "half a minute" for the
# bad canary's failure and "a minute" for the good one's verdict; these leave room for a
# loaded machine.
READY_S = 30.0
FIRST_BATCH_S = 30.0
FAILED_S = 90.0
HEALTHY_S = 240.0
STOP_S = 30.0


def section_blocks(heading: str) -> list[tuple[str, str]]:
    """The fenced blocks under ``## heading`` (up to the next ``## ``), in order: (language, text)."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)


class Terminal:
    """A long-running block, run as in a terminal of its own: bash in its own session (so that
    Ctrl-C, SIGINT to the session, reaches whatever it started), its output in a file."""

    def __init__(self, name: str, script: str, cwd: pathlib.Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = cwd / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def fail_if_exited(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited ({self.proc.returncode}):\n{self.output()[-4000:]}", pytrace=False)

    def interrupt(self) -> int:
        """Ctrl-C; the exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.name} did not stop within {STOP_S:.0f} s of Ctrl-C", pytrace=False)


def wait_for_output(terminal: Terminal, daemon: Canaryd, what: str, line: str, timeout: float) -> str:
    """Waits until ``terminal`` has printed ``line`` as a whole line; returns its output."""

    def check(output: str) -> str | None:
        terminal.fail_if_exited()
        return None if line in output.splitlines() else f"no line {line!r} yet"

    return eventually(daemon, what, terminal.output, check, timeout=timeout, show=lambda o: o[-4000:])


def run(script: str, cwd: pathlib.Path, env: dict[str, str]) -> str:
    """A block that ends by itself: its output, once it succeeded."""
    done = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{script}\nexited {done.returncode}: {done.stdout}{done.stderr}"
    return done.stdout


def http_answer(output: str) -> tuple[int, dict]:
    """The status and JSON body of `curl -si`'s output."""
    head, _, body = output.replace("\r\n", "\n").partition("\n\n")
    status = int(head.split()[1])
    return status, json.loads(body)


def test_the_first_hour_walkthrough_runs_as_written(tmp_path: pathlib.Path) -> None:
    """README's "The first hour", each block as written: the daemon with its defaults (the listeners
    on port 0 and the data in a temporary folder, through its CANARYD_* variables; models from the
    repository's models/, as when run from its root), the self-subscribing webhook receiver, the
    SDK-traced shop: a stable, a bad canary failed with a signed `canary.failed` (set_weight 0)
    while Flagger's gate answers 412, then a good canary the gate passes (200) and an operator
    promotes (a signed `canary.promoted`, weight 100). Long-running blocks run as in terminals of
    their own; the test waits, with deadlines, where the README tells its reader to wait, and
    checks each outcome the README shows."""
    blocks = section_blocks(WALKTHROUGH)
    expected = [
        ("sh", "canaryd serve"),
        ("python", "# receiver.py"),
        ("sh", "python3 receiver.py"),
        ("python", "# shop.py"),
        ("sh", "python3 shop.py 1.0.0"),
        ("sh", '"canary_version": "1.1.0"'),
        ("sh", "python3 shop.py 1.1.0 0.3"),
        ("text", "canaryd.canary.failed 1.1.0"),
        ("sh", '"version": "1.1.0"'),
        ("sh", '"canary_version": "1.1.1", "replace": true'),
        ("sh", "python3 shop.py 1.1.1"),
        ("sh", '"version": "1.1.1"'),
        ("sh", "/canary/promote"),
    ]
    assert [lang for lang, _ in blocks] == [lang for lang, _ in expected], blocks
    for (lang, text), (_, marker) in zip(blocks, expected):
        assert marker in text, f"the walkthrough's {lang} block {text!r} should contain {marker!r}"
    (
        serve,
        receiver_py,
        run_receiver,
        shop_py,
        run_stable,
        declare_bad,
        run_bad,
        receiver_shows,
        gate_bad,
        declare_good,
        run_good,
        gate_good,
        promote,
    ) = (text for _, text in blocks)

    work = tmp_path / "repo"
    work.mkdir()
    for source in (receiver_py, shop_py):
        name = re.match(r"# (\w+\.py)\b", source)
        assert name, f"a saved python block names its file on its first line: {source[:80]!r}"
        (work / name.group(1)).write_text(source)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "canaryd").symlink_to(canaryd_binary())
    python_dir = pathlib.Path(sys.executable).parent
    assert (python_dir / "python3").exists(), f"no python3 beside {sys.executable} (run pytest from a venv)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANARYD", "OTEL_"))}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(python_dir), env.get("PATH", "")])
    data_dir = work / "data"
    daemon_env = {
        **env,
        "CANARYD_DATA_DIR": str(data_dir),
        "CANARYD_OTLP_GRPC_ADDR": "127.0.0.1:0",
        "CANARYD_OTLP_HTTP_ADDR": "127.0.0.1:0",
        "CANARYD_HTTP_ADDR": "127.0.0.1:0",
        "CANARYD_MODELS_DIR": str(REPO_ROOT / "models"),
    }

    with contextlib.ExitStack() as stack:
        terminals: dict[str, Terminal] = {}

        def start(name: str, script: str, environment: dict[str, str]) -> Terminal:
            t = Terminal(name, script, work, environment)
            terminals[name] = t
            stack.callback(t.interrupt)
            return t

        # 1. The daemon, until its addresses are written.
        server = start("canaryd", serve, daemon_env)
        addrs_path = data_dir / "addrs.json"
        deadline = time.monotonic() + READY_S
        while not addrs_path.exists():
            server.fail_if_exited()
            if time.monotonic() > deadline:
                pytest.fail(f"no {addrs_path} within {READY_S:.0f} s:\n{server.output()}", pytrace=False)
            time.sleep(0.05)
        addrs = json.loads(addrs_path.read_text())
        daemon = Canaryd(server.proc, data_dir, server.log, addrs["otlp_grpc"], addrs["otlp_http"], addrs["http"])
        env["CANARYD"] = f"http://{daemon.http}"
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{daemon.otlp_http}"

        # 2. The receiver, subscribed.
        receiver = start("receiver", run_receiver, env)
        eventually(
            daemon,
            "the receiver's subscription",
            receiver.output,
            lambda o: None if "subscribed: http://127.0.0.1:" in o else (receiver.fail_if_exited() or "not yet"),
            timeout=READY_S,
        )
        status, _, body = daemon.get("/api/v1/subscriptions")
        assert status == 200 and len(json.loads(body)["subscriptions"]) == 1, body

        # 3. The stable, until canaryd has its first batch.
        start("stable", run_stable, env)

        def versions(apps: dict) -> set[str]:
            entry = find_app(apps, "shop", "default")
            return {v["version"] for v in entry["versions"] if v["requests"] > 0} if entry else set()

        eventually(
            daemon,
            "the stable's first batch",
            daemon.apps,
            lambda apps: None if versions(apps) == {"1.0.0"} else f"versions with requests: {versions(apps)}",
            timeout=FIRST_BATCH_S,
        )

        # 4. The rollout of 1.1.0, declared; the bad canary, failed; the receiver hears of it.
        declared = json.loads(run(declare_bad, work, env))
        assert (declared["stable_version"], declared["canary_version"], declared["declared"]) == (
            "1.0.0",
            "1.1.0",
            True,
        ), declared
        bad = start("bad canary", run_bad, env)
        bad_started = time.monotonic()
        shown = receiver_shows.splitlines()[0]
        output = wait_for_output(receiver, daemon, "the signed canary.failed", shown, FAILED_S)
        print(f"1.1.0 failed, and the receiver heard, {time.monotonic() - bad_started:.1f} s after it started")
        reasons = output.splitlines()[output.splitlines().index(shown) + 1 :]
        assert reasons and reasons[0].startswith("    "), f"the failure's reasons follow it:\n{output}"
        canary = json.loads(daemon.get("/api/v1/apps/shop/canary")[2])
        assert (canary["canary_version"], canary["state"]) == ("1.1.0", "failing"), canary

        # 5. Flagger's gate refuses 1.1.0.
        status, answer = http_answer(run(gate_bad, work, env))
        assert status == 412, answer
        assert (answer["canary_version"], answer["proceed"], answer["state"]) == ("1.1.0", False, "failing"), answer
        assert answer["reasons"], answer

        # 6. Ctrl-C for 1.1.0 (its last batch is sent); 1.1.1 declared in its place, and deployed.
        assert bad.interrupt() == 0, bad.output()
        declared = json.loads(run(declare_good, work, env))
        assert (declared["canary_version"], declared["state"]) == ("1.1.1", "insufficient_data"), declared
        good = start("good canary", run_good, env)
        good_started = time.monotonic()

        # 7. 1.1.1 judged healthy; the gate lets it proceed.
        eventually(
            daemon,
            "1.1.1 healthy",
            lambda: json.loads(daemon.get("/api/v1/apps/shop/canary")[2]),
            lambda c: None
            if (c["canary_version"], c["state"]) == ("1.1.1", "healthy")
            else (good.fail_if_exited() or f"{c['canary_version']} {c['state']}"),
            timeout=HEALTHY_S,
            show=lambda c: {k: c.get(k) for k in ("canary_version", "state", "score", "canary_requests", "checks")},
        )
        print(f"1.1.1 healthy {time.monotonic() - good_started:.1f} s after it started")
        status, answer = http_answer(run(gate_good, work, env))
        assert status == 200, answer
        assert (answer["canary_version"], answer["proceed"], answer["state"]) == ("1.1.1", True, "healthy"), answer

        # 8. Promoted by hand; the receiver hears of it.
        promoted = json.loads(run(promote, work, env))
        assert (promoted["canary_version"], promoted["state"]) == ("1.1.1", "promoted"), promoted
        output = wait_for_output(
            receiver,
            daemon,
            "the signed canary.promoted",
            'canaryd.canary.promoted 1.1.1 {"kind": "set_weight", "app": "shop", "version": "1.1.1", "weight": 100}',
            READY_S,
        )
        # One verdict of each, each delivered once (a delivery is printed only once its signature
        # checked out).
        types = [line.split()[0] for line in output.splitlines() if line.startswith("canaryd.")]
        assert types == ["canaryd.canary.failed", "canaryd.canary.promoted"], output

        # Ctrl-C everywhere; canaryd drains and exits 0.
        for name in ("good canary", "stable", "receiver"):
            terminals[name].interrupt()
        assert server.interrupt() == 0, server.output()[-4000:]
