"""Feishu callback security against PROTOCOLS.md's test vectors (V1 is Feishu's own published sample)."""

from __future__ import annotations

import json

import pytest

from adapters.feishu_crypto import decrypt, encrypt, signature, verify_signature
from core.errors import Unauthorized

V2_BODY = ('{"encrypt":"AAECAwQFBgcICQoLDA0OD4lbLV3qQ+hF0OqJsFHEU8ISGhUtwa58IM7SVcncm9g7M9M3ibxyyFzfwfwlfINlPb'
           'rMp4cWGV0CTEGjGryqi7ex6qlpdql0HH81VdI6KNC++gbs5G5P9meRIQJP1jM4lQ=="}')
V2_PLAIN = '{"challenge":"c-0123456789","token":"demo-verification-token","type":"url_verification"}'
V3_BODY = ('{"encrypt":"/+7dzLuqmYh3ZlVEMyIRAAMBWcOx7Zm3o1eh7i3X16owQjigCEHCOc1Sr24UT2MxDQHi1QjiPPHoeBnuKW66WPPe'
           'IcZsyVnXpSEwprQmeMVtR6evGM9YMB/kkKR5tSgHfs3P4UeqX2Wp8ie9lQifeR9cYbxsmKhtsDpkcp2Rq6UARsfsjZ4F4I4LwArP2'
           '5QDTBvVZuxfu+Ur5GO9Xp6O8HYzfYP8cZEZ1f0dBP/wPsNviPqFPrJHTaxsvi2+ZQrmW8k2w3Kvl2gVio+Je+GClPEZz1SR7oTKH'
           'gKbpJ+ooF2eOGDiOZ1LBrGZAWEs849FWeMvUGZEzkKuoBi7t/ltNcWkHrFs+cpputVF8CvmbfoEc1dkL0/PauGlQ4OmN7uKCQ76Q'
           'XT8fgfdc+vcvX33ayHAEOIEPD68rCh8TcXGPu3im8JGda/Y4LrLB7q5b+/pOZsO5XR4FKEtIeI6l+V5y6qmOF6ALqtO/0V71Owsk'
           'E59N2nFIC+xwdRlZP2uaxKxRUwZKWnaQ5NqkYLV1TX7UfOzxovbNLF88AlmVQkNssmnI97wEj9uCy6YpA3xmhfF486jZI1Kvf/Rf'
           'luM5kNoeH47Iyo9KolwkfGQRy983GTuNnfRveOpR2ZRTikmfulg2UwQVDgmz6iB1S4a/7O9fg=="}')
KEY = "demo-encrypt-key-0001"


def test_feishus_published_sample_decrypts():
    assert decrypt("test key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=") == "hello world"


def test_an_encrypted_url_verification_decrypts_and_encrypts_back_byte_for_byte():
    encrypted = json.loads(V2_BODY)["encrypt"]
    assert decrypt(KEY, encrypted) == V2_PLAIN
    assert encrypt(KEY, V2_PLAIN, bytes(range(16))) == encrypted


def test_an_encrypted_event_and_its_signature():
    event = json.loads(decrypt(KEY, json.loads(V3_BODY)["encrypt"]))
    assert event["header"]["event_id"] == "ev-demo-0001"
    assert event["event"]["message"]["message_id"] == "om_demo_1"
    expected = "3d4b3fa802cf3ebb2420c81651bc5db72f9a3508bf4032e19cd50b584a1c3bdf"
    assert signature("1700000000", "nonce-demo-42", KEY, V3_BODY.encode()) == expected
    verify_signature("1700000000", "nonce-demo-42", expected, KEY, V3_BODY.encode())
    for timestamp, nonce, body in (("1700000001", "nonce-demo-42", V3_BODY.encode()),
                                   ("1700000000", "nonce-demo-43", V3_BODY.encode()),
                                   ("1700000000", "nonce-demo-42", V3_BODY.encode() + b" ")):
        with pytest.raises(Unauthorized):
            verify_signature(timestamp, nonce, expected, KEY, body)


@pytest.mark.parametrize("body", ["not base64!", "AAAA", json.loads(V2_BODY)["encrypt"]])
def test_garbage_or_a_wrong_key_is_refused(body):
    with pytest.raises(Unauthorized):
        decrypt("some-other-key", body)
