"""The README's code is run as written: the webhook signature check a receiver copies verifies the
Standard Webhooks reference vector (the one canaryd's own signing test reproduces), and refuses a
tampered body."""
import pathlib
import re

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
