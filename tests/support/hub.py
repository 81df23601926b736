"""The regional hub as a real peer for tests: ``pas hub run`` in a child process, enrolment
through the real CLI, and real sealed buckets built with the codec engineer's pack/seal.

Binds to 127.0.0.1 on a free port; its home is the test's temporary folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread

from appliance.hub.pki import HubPKI, parse_validity
from appliance.store.hub import add_token, open_hub_db
from appliance.transfer import pack, seal
from appliance.transfer.enrolment import Enrolment, load_enrolment
from appliance.transfer.enrolment import enroll as enroll_appliance
from tests.support.peers import ChildProcess, NetNamespace, free_port, run_pas


class HubProcess(ChildProcess):
    """``pas hub run`` with a private ``$PAS_HUB_HOME``; ``init()`` runs ``pas hub init``."""

    name = "hub"
    command = ("hub", "run")
    cli_prefix = ("hub",)

    def __init__(self, home: Path, env: dict[str, str] | None = None,
                 ns: NetNamespace | None = None):
        """``ns``: run inside that network namespace (the caller creates and deletes it),
        on its far address, as a hub across a WAN would be (a :class:`BlackHole` there
        cuts it off); else on 127.0.0.1."""
        self.port = free_port()
        self.ns = ns
        host = ns.inner_address if ns is not None else "127.0.0.1"
        if ns is not None:
            self.probe_host = host
            self.launcher = tuple(ns.command([]))
        super().__init__(home, {**os.environ, "PAS_HUB_HOME": str(home),
                                "PAS_HUB_HTTP__HOST": host,
                                "PAS_HUB_HTTP__PORT": str(self.port),
                                # The tests' regional archive is Orthanc in its own namespace
                                # (198.18.0.0/15), over plain http://: the refusal of that
                                # without the key has its own test (test_hub_archive_tls.py).
                                "PAS_HUB_ARCHIVE__ALLOW_CLEARTEXT": "true",
                                **(env or {})}, "hub.log")

    @property
    def url(self) -> str:
        host = self.ns.inner_address if self.ns is not None else "localhost"
        return f"https://{host}:{self.port}"

    def init(self, *addresses: str, cli: bool = False) -> HubProcess:
        """``pas hub init`` (``cli=True``), or the same calls in this process: a CLI start costs
        seconds on a loaded 2-core machine, and only the CLI's own tests need it."""
        if not addresses and self.ns is not None:
            addresses = (self.ns.inner_address,)
        if cli:
            extra = [a for address in addresses for a in ("--address", address)]
            self.cli("init", *extra)
        else:
            HubPKI(self.home).init(list(addresses) or None)
            open_hub_db(self.home / "hub.sqlite").close()
        return self

    def token(self, site: str, cli: bool = False, valid_for: str = "7d") -> str:
        """A one-time token, from ``pas hub token`` (``cli=True``) or the same calls in-process."""
        if cli:
            return self.cli("token", site, "--valid-for", valid_for).stdout.strip()
        token, digest = HubPKI(self.home).new_token(site)
        db = open_hub_db(self.home / "hub.sqlite")
        try:
            add_token(db, site, digest,
                      time.time() + parse_validity(valid_for).total_seconds())
        finally:
            db.close()
        return token

    def start(self, timeout: float = 30.0) -> HubProcess:
        with self.stopped_if_start_fails():
            self._launch([self.port], timeout)
        return self

    def anonymous_context(self) -> ssl.SSLContext:
        """Trusts the hub's CA but presents no client certificate."""
        context = ssl.create_default_context(cafile=str(self.home / "ca.crt"))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context


def enroll(hub: HubProcess, home: Path, site: str, cli: bool = False) -> Enrolment:
    """Enrol ``home`` (``$PAS_HOME``) with the hub: ``pas enroll`` through the real CLI
    (``cli=True``; the token on standard input, as an operator should give it), or the same
    function it calls, in this process."""
    token = hub.token(site, cli=cli)
    if cli:
        env = {**os.environ, "PAS_HOME": str(home)}
        env.pop("PAS_CONFIG", None)
        env.pop("PAS_ENROLL_TOKEN", None)
        result = run_pas(["enroll", "--hub", hub.url, "--token", "-"], env,
                         input=f"{token}\n", timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "warning" not in result.stderr, result.stderr
    else:
        enroll_appliance(home, hub.url, token)
    enrolment = load_enrolment(home)
    assert enrolment is not None
    return enrolment


def client(enrolment: Enrolment) -> httpx.Client:
    return httpx.Client(base_url=enrolment.url, verify=enrolment.ssl_context(), timeout=120)


@dataclass
class Shipment:
    """One study packed and sealed for a hub: what an appliance would send."""

    transfer_id: str
    key: bytes
    manifest: dict[str, Any]
    buckets: list[bytes]
    originals: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> SHA-256

    def put_all(self, http: httpx.Client) -> list[int]:
        statuses = []
        for index, sealed in enumerate(self.buckets):
            statuses.append(http.put(self.bucket_url(index), content=sealed).status_code)
        return statuses

    def bucket_url(self, index: int) -> str:
        return f"/api/v1/transfers/{self.transfer_id}/buckets/{index}"

    @property
    def url(self) -> str:
        return f"/api/v1/transfers/{self.transfer_id}"


def pack_items(files: list[Path]) -> list[pack.PackItem]:
    items = []
    for path in files:
        data = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                  .SOPInstanceUID)
        items.append(pack.PackItem(uid, path, len(data), hashlib.sha256(data).hexdigest()))
    return items


def ship(items: list[pack.PackItem], hub_public: bytes, target_bytes: int = 2 << 20,
         study_uid: str = "1.2.3") -> Shipment:
    """Plan, pack and seal ``items`` for a new transfer, as the uplink does."""
    transfer_id = str(uuid.uuid4())
    key = seal.new_transfer_key()
    plans = pack.plan_buckets(items, target_bytes)
    where: dict[str, list[int]] = {}
    buckets = []
    for plan in plans:
        plaintext, _stats = pack.pack_bucket(plan)
        buckets.append(seal.seal_bucket(key, transfer_id, plan.index, plaintext))
        for item, _offset, _length in plan.entries:
            where.setdefault(item.sop_instance_uid, []).append(plan.index)
    manifest = {
        "transfer_id": transfer_id, "study_uid": study_uid, "priority": 0,
        "wrapped_key": base64.b64encode(seal.wrap_key(key, hub_public, transfer_id)).decode(),
        "bucket_count": len(plans),
        "instances": [{"sop_instance_uid": i.sop_instance_uid, "sop_class_uid": "",
                       "size": i.size, "sha256": i.sha256,
                       "buckets": sorted(set(where[i.sop_instance_uid]))} for i in items],
    }
    return Shipment(transfer_id, key, manifest, buckets,
                    {i.sop_instance_uid: i.sha256 for i in items})


def dump(document: Any) -> str:
    return json.dumps(document, indent=1)[:2000]
