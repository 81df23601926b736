"""Every hub route that reads a request body bounds it, whatever its framing (invariant 8), and
bad values in a body get a clear 4xx (invariant 7).

Real peers: ``pas hub run`` (embedded archive, ``limits.max_manifest_bytes`` 8000), and one with
a ``dicomweb`` archive whose URL answers nothing (the priors search reads its body before it
asks the archive). The over-limit bodies go on a raw TLS socket, so that the test sees when the
413 comes: with a Content-Length over the limit and no body at all, and chunked with more than
the limit but never finished. A route that buffered the whole body first would still be
waiting for the rest when the socket's timeout ends the test.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import MR_DIR, free_port

MANIFEST_LIMIT = 8000
ANSWER_TIMEOUT_S = 20.0  # an upper bound for the 413, not a wait: the answer ends it


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub") / "home",
                         {"PAS_HUB_LIMITS__MAX_MANIFEST_BYTES": str(MANIFEST_LIMIT)}).init()
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def site(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Enrolment:
    return enroll(hub, tmp_path_factory.mktemp("site"), "CHU-LIMITS")


def _answer_before_the_body_ends(hub: HubProcess, context: ssl.SSLContext, path: str,
                                 framing: str, size: int) -> tuple[int, dict[str, str]]:
    """POST ``path`` on a raw TLS socket: ``framing`` "length" declares ``size`` bytes and sends
    none; "chunked" sends ``size`` bytes in chunks and never the last chunk. Returns the
    answer's status and JSON body, read while the request is still unfinished."""
    head = f"POST {path} HTTP/1.1\r\nHost: localhost:{hub.port}\r\n" \
           "Content-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", hub.port), timeout=ANSWER_TIMEOUT_S) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        if framing == "length":
            tls.sendall(f"{head}Content-Length: {size}\r\n\r\n".encode())
        else:
            tls.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b" " * 4096
            for _ in range(size // len(chunk) + 1):
                tls.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not _complete(answer):
            data = tls.recv(65536)  # socket.timeout (the test fails) if no answer comes
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_every_body_route_answers_413_before_reading_past_its_limit(
        hub: HubProcess, site: Enrolment, framing: str) -> None:
    routes = [("/enroll", hub.anonymous_context(), 64 * 1024, "enrolment request"),
              ("/api/v1/transfers", site.ssl_context(), MANIFEST_LIMIT, "manifest"),
              ("/api/v1/downloads", site.ssl_context(), MANIFEST_LIMIT, "request"),
              ("/api/v1/downloads/lanes", site.ssl_context(), 4096, "lane request"),
              ("/api/v1/holdings", site.ssl_context(), MANIFEST_LIMIT, "holdings request"),
              ("/api/v1/heartbeat", site.ssl_context(), 64 * 1024, "heartbeat")]
    for path, context, limit, what in routes:
        status, body = _answer_before_the_body_ends(hub, context, path, framing, limit + 1)
        assert (status, body) == (413, {"error": "too_large",
                                        "detail": f"{what} over {limit} bytes"}), path
    with client(site) as http:  # the hub goes on serving
        assert http.get("/api/v1/whoami").json() == {"site": "CHU-LIMITS"}


def test_a_chunked_manifest_over_the_limit_is_413_and_nothing_is_stored(
        hub: HubProcess, site: Enrolment) -> None:
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:2]
    shipment = ship(pack_items(files), site.hub_transfer_key)
    body = (json.dumps(shipment.manifest) + " " * MANIFEST_LIMIT).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length
        for start in range(0, len(body), 1024):
            yield body[start:start + 1024]

    with client(site) as http:
        for content in (body, chunked()):
            answer = http.post("/api/v1/transfers", content=content,
                               headers={"Content-Type": "application/json"})
            assert answer.status_code == 413, answer.text
            assert answer.json()["detail"] == f"manifest over {MANIFEST_LIMIT} bytes"
        assert http.get(shipment.url).status_code == 404  # nothing was created
        # The same manifest within the limit is created: the hub goes on serving.
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201


def test_the_priors_routes_bound_their_body_and_its_nesting_too(tmp_path: Path) -> None:
    """With a ``dicomweb`` archive the search reads its body (the embedded archive answers 501
    unread); the archive here answers nothing: the 413 comes before any search."""
    hub = HubProcess(tmp_path / "hub", {
        "PAS_HUB_ARCHIVE__KIND": "dicomweb",
        "PAS_HUB_ARCHIVE__URL": f"http://127.0.0.1:{free_port()}/dicom-web",
        "PAS_HUB_LIMITS__MAX_MANIFEST_BYTES": str(MANIFEST_LIMIT)}).init().start()
    try:
        site = enroll(hub, tmp_path / "site", "CHU-PRIORS")
        for path in ("/api/v1/downloads/search", "/api/v1/downloads/priors"):
            status, body = _answer_before_the_body_ends(hub, site.ssl_context(), path,
                                                        "chunked", MANIFEST_LIMIT + 1)
            assert (status, body["error"]) == (413, "too_large"), path
        with httpx.Client(base_url=hub.url, verify=site.ssl_context()) as http:
            for path, content_type in (("/api/v1/downloads/search", "application/json"),
                                       ("/api/v1/downloads/priors", "application/x-ndjson")):
                deep = http.post(path, content=_deep(2000),
                                 headers={"Content-Type": content_type})
                assert (deep.status_code, deep.json()["error"]) == (400, "bad_json"), path
            assert http.get("/api/v1/whoami").status_code == 200
    finally:
        hub.stop()


def test_a_value_of_the_wrong_json_type_is_refused_at_create_naming_its_path(
        hub: HubProcess, site: Enrolment) -> None:
    """Lax validation took "529214" as a size and ["0"] as buckets, the raw manifest was stored,
    and the commit could then never succeed (422 sha256_mismatch for identical digests)."""
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[2:4]
    shipment = ship(pack_items(files), site.hub_transfer_key)
    with client(site) as http:
        for field, value, path in (("size", str(shipment.manifest["instances"][0]["size"]),
                                    "instances.0.size"),
                                   ("buckets", ["0"], "instances.0.buckets.0")):
            manifest = json.loads(json.dumps(shipment.manifest))
            manifest["instances"][0][field] = value
            answer = http.post("/api/v1/transfers", json=manifest)
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"] == "bad_manifest"
            assert answer.json()["detail"].startswith(f"{path}: "), answer.json()["detail"]
            assert http.get(shipment.url).status_code == 404  # nothing was created
        # As the appliance sends it (integers): created, and it commits.
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        assert shipment.put_all(http) == [201] * len(shipment.buckets)
        assert http.post(shipment.url + "/commit").status_code == 200


def test_out_of_range_priority_and_size_are_422_naming_the_field(
        hub: HubProcess, site: Enrolment) -> None:
    """priority 10**20 overflowed SQLite's INTEGER (500, retried by the appliance as
    transient); a negative one would jump every other site's urgent studies."""
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[4:5]
    shipment = ship(pack_items(files), site.hub_transfer_key)
    with client(site) as http:
        for change, path in (({"priority": 10**20}, "priority"),
                             ({"priority": -1}, "priority"),
                             ({"instances": [{**shipment.manifest["instances"][0],
                                              "size": 2**60}]}, "instances.0.size")):
            answer = http.post("/api/v1/transfers", json={**shipment.manifest, **change})
            assert answer.status_code == 422, answer.text
            assert answer.json()["detail"].startswith(f"{path}: "), answer.json()["detail"]
        assert http.get(shipment.url).status_code == 404
        urgent = {**shipment.manifest, "priority": 0}
        assert http.post("/api/v1/transfers", json=urgent).status_code == 201


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_deeply_nested_json_is_a_clear_4xx_on_every_route(hub: HubProcess,
                                                          site: Enrolment) -> None:
    """Python's JSON parser raises RecursionError, not ValueError, past ~1000 levels: it was a
    500 (or, at 2000 levels, a connection closed with no answer)."""
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[5:6]
    shipment = ship(pack_items(files), site.hub_transfer_key)
    with client(site) as http, \
            httpx.Client(base_url=hub.url, verify=hub.anonymous_context()) as anonymous:
        for depth in (1000, 2000):
            for session, path, expected in (
                    (http, "/api/v1/transfers", (400, "bad_json")),
                    (http, "/api/v1/downloads", (400, "bad_json")),
                    (http, "/api/v1/downloads/lanes", (400, "bad_json")),
                    (http, "/api/v1/holdings", (400, "bad_json")),
                    (http, "/api/v1/heartbeat", (422, "bad_heartbeat")),
                    (anonymous, "/enroll", (400, "bad_request"))):
                answer = session.post(path, content=_deep(depth),
                                      headers={"Content-Type": "application/json"})
                assert (answer.status_code, answer.json()["error"]) == expected, (path, depth)
        # Deep but parseable, in a field the manifest ignores: created, not a 500.
        nested = json.loads(json.dumps(shipment.manifest))
        nested["comment"] = json.loads(_deep(500))
        assert http.post("/api/v1/transfers", json=nested).status_code == 201
        assert http.get("/api/v1/whoami").status_code == 200


def test_a_transfer_id_with_a_trailing_newline_is_refused_naming_the_field(
        hub: HubProcess, site: Enrolment) -> None:
    """``re.match`` with ``$`` also matches before a final newline: "<uuid>\\n" passed as a
    transfer id (201), and the hub made a bucket folder and log lines with a line break in
    their name. Refused now as any other malformed id; nothing is created."""
    import base64

    from appliance.transfer import seal

    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[5:6]
    shipment = ship(pack_items(files), site.hub_transfer_key)
    bad_id = shipment.transfer_id + "\n"
    wrapped = seal.wrap_key(shipment.key, site.hub_transfer_key, bad_id)
    manifest = {**shipment.manifest, "transfer_id": bad_id,
                "wrapped_key": base64.b64encode(wrapped).decode()}
    with client(site) as http:
        answer = http.post("/api/v1/transfers", json=manifest)
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith("transfer_id: "), answer.json()["detail"]
    assert (bad_id,) not in _transfer_ids(hub)


def _transfer_ids(hub: HubProcess) -> list[tuple[str]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(hub.home / "hub.sqlite")) as db:
        return db.execute("SELECT id FROM transfers").fetchall()


def test_a_download_s_uid_with_a_trailing_newline_is_refused_naming_it(
        hub: HubProcess, site: Enrolment) -> None:
    """The download protocol's UID check (and the lane id's) had the same "$": a study UID
    "1.2.3\\n" was taken as a UID and searched. Refused now, as any other malformed one."""
    with client(site) as http:
        for body, field in (({"study_uid": "1.2.840.113619\n"}, "study_uid"),
                            ({"study_uid": "1.2.840.113619",
                              "series_uid": "1.2.840.113619.2\n"}, "series_uid")):
            answer = http.post("/api/v1/downloads", json=body)
            assert answer.status_code == 422, answer.text
            assert answer.json()["detail"].startswith(f"{field}: not a DICOM UID"), answer.text
        assert http.get("/api/v1/whoami").status_code == 200


def test_a_bucket_index_that_is_not_a_small_number_is_refused_naming_it(
        hub: HubProcess, site: Enrolment) -> None:
    """Starlette's {index:int} ran int() in the routing: 4301 digits or more raised there, a
    500 a site retries as a passing fault. Now the index is read by the handler: past the
    transfer's buckets, however long, a 416 naming it; not a number, a 400."""
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[6:7]
    shipment = ship(pack_items(files), site.hub_transfer_key)
    with client(site) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        for index, status in (("9" * 5000, 416), ("99999999999999999999", 416),
                              ("-1", 400), ("1e3", 400), ("\u0661", 400)):
            answer = http.put(f"{shipment.url}/buckets/{index}", content=shipment.buckets[0])
            assert answer.status_code == status, (index[:20], answer.text[:200])
            detail = answer.json()["detail"]
            assert detail.startswith("bucket index " + (
                index[:12] if status == 416 else "must be")), detail[:200]
        assert shipment.put_all(http) == [201] * len(shipment.buckets)
        assert http.post(shipment.url + "/commit").status_code == 200


BIG_BUCKET_MB = 48


def test_a_bucket_put_holds_about_one_copy_of_the_bucket_in_memory(
        hub: HubProcess, site: Enrolment) -> None:
    """Each bucket PUT held about four copies of the bucket at the peak: the body as read,
    bytes() of it, the ciphertext sliced off the nonce, and the plaintext decrypted only to
    check the tag (64 MiB buckets, 256 MiB per PUT, and nothing caps the PUTs of a region's
    sites at once: invariant 8). Now the tag is checked as the ciphertext streams through the
    decryptor, a megabyte at a time; the bucket is still refused when tampered."""
    from appliance.transfer import seal
    from tests.test_ingest_spill import peak_rss_mb
    from tests.test_serving_memory import _reset_peak

    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[7:8]
    shipment = ship(pack_items(files), site.hub_transfer_key)
    big = seal.seal_bucket(shipment.key, shipment.transfer_id, 0,
                           bytes(BIG_BUCKET_MB << 20))  # authenticates; never unpacked here
    tampered = bytearray(big)
    tampered[len(big) // 2] ^= 1
    assert hub.proc is not None
    # Its instances name no bucket, so the archiver's rounds ahead of the commit read none:
    # the peak is the PUT's alone (the archiver decrypting the stored 48 MB, started as the
    # PUT answers, counted its own two copies in 1 run of 8).
    manifest = {**shipment.manifest, "instances": [
        {k: v for k, v in instance.items() if k != "buckets"}
        for instance in shipment.manifest["instances"]]}
    with client(site) as http:
        assert http.post("/api/v1/transfers", json=manifest).status_code == 201
        answer = http.put(f"{shipment.url}/buckets/0", content=bytes(tampered))
        assert answer.status_code == 400 and answer.json()["error"] == "bucket_rejected"
        del tampered
        _reset_peak(hub.proc.pid)
        before = peak_rss_mb(hub.proc.pid)
        assert http.put(f"{shipment.url}/buckets/0", content=big).status_code == 201
        growth = peak_rss_mb(hub.proc.pid) - before
    # Measured: +47.9 MB (one copy: the body as read); +191.9 MB before (four).
    assert growth < 1.5 * BIG_BUCKET_MB, f"peak RSS grew {growth:.0f} MB for one PUT"
    stored = hub.home / "buckets" / shipment.transfer_id / "000000.bkt"
    assert stored.read_bytes() == big
