"""A manifest read, validated and hashed a piece at a time (so that the hub's event loop keeps
the GIL between pieces) gives exactly what the one-call versions gave: the same values, the
same errors, the same canonical SHA-256, the same refusals naming the same paths.

The loop's responsiveness itself is measured, not asserted (no timing in tests): the hub's
commit message gives the numbers. Real peer for the last test: ``pas hub run``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.hub import manifest_json
from appliance.hub.transfers import VALIDATE_CHUNK, Manifest, _validated
from appliance.transfer import seal
from tests.support.hub import HubProcess, client, enroll

BIG = 2 * max(VALIDATE_CHUNK, manifest_json.PIECE) + 7  # several pieces and a partial one

DOCUMENTS = [
    "{}", ' { "a" : [ ] } ', '{"a":[1,2,{"x":[1,2]}],"b":"\\u00e9","a":5}', "[1,2]", '"x"',
    '{"a":1,}', '{"a":[1,]}', '{"a":1} x', '\ufeff{"a":1}', '{"a":NaN}', '{"a":1', "",
    '{"a" 1}', "{1:2}", '{"a":[' + "[" * 5000 + "]" * 5000 + "]}",
    '{"k":[' + ",".join(str(i) for i in range(BIG)) + "]}",
]


def _outcome(call: Any) -> tuple[Any, ...]:
    try:
        value = call()
    except (ValueError, RecursionError) as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("value", value, list(value) if isinstance(value, dict) else None)


@pytest.mark.parametrize("document", DOCUMENTS, ids=range(len(DOCUMENTS)))
def test_loads_is_json_loads_value_error_and_key_order(document: str) -> None:
    for form in (document, document.encode()):
        expected = _outcome(lambda f=form: json.loads(f))
        assert _outcome(lambda f=form: manifest_json.loads(f)) == expected
        if expected[0] == "value":
            canonical = json.dumps(expected[1], sort_keys=True, separators=(",", ":")).encode()
            assert manifest_json.canonical_sha256(expected[1]) == \
                hashlib.sha256(canonical).hexdigest()


def _manifest(count: int) -> dict[str, Any]:
    hub_private, hub_public = seal.generate_hub_keypair()
    transfer_id = str(uuid.uuid4())
    return {"transfer_id": transfer_id, "study_uid": "1.2.3", "priority": 2,
            "wrapped_key": base64.b64encode(seal.wrap_key(seal.new_transfer_key(), hub_public,
                                                          transfer_id)).decode(),
            "bucket_count": 1, "extra": {"b": [1.5, None, True], "a": "é"},
            "instances": [{"sop_instance_uid": f"1.2.3.{n}", "size": n,
                           "sha256": hashlib.sha256(str(n).encode()).hexdigest(),
                           "buckets": [0]} for n in range(count)]}


def test_a_large_manifest_validates_and_hashes_as_the_one_calls_did() -> None:
    data = _manifest(BIG)
    assert _validated(data) == Manifest.model_validate(data)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert manifest_json.canonical_sha256(data) == hashlib.sha256(canonical).hexdigest()
    for number, field, value in ((BIG - 3, "sha256", "NOT HEX"), (VALIDATE_CHUNK, "size", "7")):
        bad = copy.deepcopy(data)
        bad["instances"][number][field] = value
        with pytest.raises(ValidationError) as whole:
            Manifest.model_validate(bad)
        with pytest.raises(ValidationError) as pieces:
            _validated(bad)
        assert str(pieces.value) == str(whole.value)
        assert f"instances.{number}.{field}" in str(pieces.value).replace("\n", ".")


def test_the_hub_takes_a_large_manifest_tells_a_repeat_and_names_a_bad_instance(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init().start()
    try:
        site = enroll(hub, tmp_path / "site", "CHU-LARGE")
        data = _manifest(BIG)
        data["wrapped_key"] = base64.b64encode(seal.wrap_key(
            seal.new_transfer_key(), site.hub_transfer_key, data["transfer_id"])).decode()
        with client(site) as http:
            spaced = json.dumps(data, indent=1).encode()  # the same manifest, other bytes
            assert http.post("/api/v1/transfers", json=data).status_code == 201
            assert http.post("/api/v1/transfers", content=spaced,
                             headers={"Content-Type": "application/json"}).status_code == 200
            other = copy.deepcopy(data)
            other["instances"][BIG - 1]["size"] += 1
            assert http.post("/api/v1/transfers", json=other).status_code == 409
            other["transfer_id"] = str(uuid.uuid4())
            other["instances"][BIG - 2]["buckets"] = ["0"]
            answer = http.post("/api/v1/transfers", json=other)
            assert answer.status_code == 422
            assert answer.json()["detail"].startswith(f"instances.{BIG - 2}.buckets.0: ")
            state = http.get(f"/api/v1/transfers/{data['transfer_id']}").json()
            assert (state["bucket_count"], state["held"], state["committed"]) == (1, 0, False)
    finally:
        hub.stop()
