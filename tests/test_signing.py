"""Standard Webhooks signatures against the published test vector and the reference library."""

from __future__ import annotations

import pytest

from adapters.signing import StandardWebhookSigner
from core.errors import ConfigError, Unauthorized
from helpers import signed_headers

# PROTOCOLS.md V8, published with the Standard Webhooks specification.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
V8 = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
      "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
BODY = b'{"test": 2432232314}'


def test_published_vector():
    signer = StandardWebhookSigner(SECRET)
    assert signer.signature(V8["webhook-id"], 1614265330, BODY) == V8["webhook-signature"]
    assert signer.verify(V8, BODY, now=1614265330 + 10) == "msg_p5jXN8AQM9LWM0D4loKWxJek"


def test_reference_library_signatures_verify():
    headers = signed_headers(SECRET, "msg_1", BODY)
    assert StandardWebhookSigner(SECRET).verify(headers, BODY) == "msg_1"


def test_one_of_several_signatures_may_match_during_rotation():
    headers = {**V8, "webhook-signature": "v1,AAAA " + V8["webhook-signature"]}
    assert StandardWebhookSigner(SECRET).verify(headers, BODY, now=1614265330)


@pytest.mark.parametrize(("change", "now"), [
    ({"webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OF="}, 1614265330),
    ({"webhook-id": "msg_other"}, 1614265330),
    ({"webhook-timestamp": "1614265331"}, 1614265330),
    ({}, 1614265330 + 301),  # replayed after the window
    ({}, 1614265330 - 301),  # from the future
    ({"webhook-timestamp": "soon"}, 1614265330),
    ({"webhook-signature": ""}, 1614265330),
])
def test_refused(change, now):
    with pytest.raises(Unauthorized):
        StandardWebhookSigner(SECRET).verify({**V8, **change}, BODY, now=now)


def test_body_bytes_are_signed_as_they_are():
    signer = StandardWebhookSigner(SECRET)
    binary = b"--b\r\n\xff\xd8\xff binary image bytes"
    headers = signer.headers("msg_bin", binary)
    assert signer.verify(headers, binary) == "msg_bin"
    with pytest.raises(Unauthorized):
        signer.verify(headers, binary + b"x")


def test_bad_secret_is_a_config_error():
    with pytest.raises(ConfigError, match=r"adapters\.webhook\.secret"):
        StandardWebhookSigner("whsec_not*base64")
