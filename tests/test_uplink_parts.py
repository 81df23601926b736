"""The uplink's parts on their own: the token bucket and its time windows (on a fake clock: no
timing assertions), the hub client's retry policy against a real local HTTP server, the
receipt signature check, and the [hub] configuration's errors."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.config import ConfigError, HubSection, RateWindow, load_settings
from appliance.transfer.client import (
    HubClient,
    HubRefused,
    HubUnavailable,
    ReceiptInvalid,
    canonical_json,
    verify_receipt,
)
from appliance.transfer.throttle import CHUNK, TokenBucket, cap_mbps, in_window
from tests.support.peers import free_port
from tests.support.serving import serve_in_thread


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_token_bucket_releases_bytes_at_the_cap() -> None:
    clock = FakeClock()
    rate = 1_000_000.0  # bytes/s
    bucket = TokenBucket(lambda: rate, clock=clock, sleep=clock.sleep)
    sent = 0
    for _ in range(200):
        bucket.acquire(CHUNK)
        sent += CHUNK
    # 200 chunks at 1 MB/s: the clock advanced by the bytes over the rate, less one burst.
    burst = max(rate / 4, CHUNK)
    assert (sent - burst) / rate <= clock.now <= sent / rate + 0.01


def test_token_bucket_unlimited_never_waits_and_follows_a_changing_rate() -> None:
    clock = FakeClock()
    rate = {"value": 0.0}
    bucket = TokenBucket(lambda: rate["value"], clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        bucket.acquire(CHUNK)
    assert clock.slept == 0
    rate["value"] = 100_000.0  # a window opened: 0.8 Mbit/s
    for _ in range(20):
        bucket.acquire(CHUNK)
    assert clock.slept >= (20 * CHUNK - CHUNK) / 100_000.0


@pytest.mark.parametrize("rate", [1e6, 0.0], ids=["capped", "uncapped"])
def test_routine_uploads_wait_while_an_urgent_one_runs(rate: float) -> None:
    """Capped or not (no cap is the default), a routine PUT's next chunk waits while an urgent
    upload runs. Uncapped, the routine PUTs used to go on beside it: on a 4 Mbit/s line a
    4-image urgent study took 4.5-8.0 s beside a routine CT upload instead of 1.5 s alone."""
    clock = FakeClock()
    bucket = TokenBucket(lambda: rate, clock=clock, sleep=clock.sleep)
    released = threading.Event()

    def routine() -> None:
        bucket.acquire(CHUNK)
        released.set()

    with bucket.urgent():
        bucket.acquire(CHUNK, urgent=True)  # the urgent one is not held back
        worker = threading.Thread(target=routine, daemon=True)
        worker.start()
        worker.join(0.3)
        assert not released.is_set()
    worker.join(5)
    assert released.is_set()


def test_windows_pick_the_cap_and_may_wrap_midnight() -> None:
    config = HubSection(max_mbps=0, windows=[
        RateWindow(start="07:00", end="19:00", max_mbps=8),
        RateWindow(start="22:00", end="02:00", max_mbps=50),
    ])
    at = dt.datetime(2026, 11, 23)
    assert cap_mbps(config, at.replace(hour=7)) == 8
    assert cap_mbps(config, at.replace(hour=18, minute=59)) == 8
    assert cap_mbps(config, at.replace(hour=19)) == 0  # unlimited outside the windows
    assert cap_mbps(config, at.replace(hour=23)) == 50
    assert cap_mbps(config, at.replace(hour=1, minute=30)) == 50
    assert not in_window(config.windows[1], at.replace(hour=2))


@pytest.mark.parametrize("env, expected", [
    ({"PAS_HUB__WINDOWS": '[{start="7h", end="19:00", max_mbps=8}]'},
     "hub.windows.0.start: must be HH:MM"),
    ({"PAS_HUB__MAX_MBPS": "-1"}, "hub.max_mbps"),
    ({"PAS_HUB__PARALLEL_BUCKETS": "0"}, "hub.parallel_buckets"),
    ({"PAS_HUB__SPEED": "1"}, "hub.speed: unknown key"),
])
def test_bad_hub_config_names_the_key(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert expected in str(caught.value)


# --- the client's retry policy, against a real HTTP server ---------------------------------


class _Script(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    seen: list[str] = []
    auth: list[str | None] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).seen.append(f"{self.command} {self.path} {length}")
        type(self).auth.append(self.headers.get("Authorization"))
        status = type(self).answers.pop(0) if type(self).answers else 200
        body = json.dumps({"error": "x", "detail": f"scripted {status}",
                           "held": [0, 2], "count": 3}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[type[_Script], str]]:
    handler = type("Script", (_Script,), {"answers": [], "seen": [], "auth": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    serve_in_thread(server)
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_client_retries_5xx_then_succeeds(scripted: tuple[type[_Script], str]) -> None:
    handler, url = scripted
    handler.answers = [503, 502, 201]
    contacts: list[bool] = []
    client = HubClient(url, False, retries=3, backoff_max_s=0.05,
                       on_contact=lambda ok, _error: contacts.append(ok))
    assert client.put_bucket("t1", 0, b"x" * 1000).status == 201
    assert handler.seen == ["PUT /api/v1/transfers/t1/buckets/0 1000"] * 3  # same body each time
    assert contacts == [True]


def test_client_never_retries_4xx(scripted: tuple[type[_Script], str]) -> None:
    handler, url = scripted
    handler.answers = [400]
    client = HubClient(url, False, retries=3, backoff_max_s=0.05)
    with pytest.raises(HubRefused) as caught:
        client.put_bucket("t1", 1, b"y")
    assert caught.value.status == 400 and "scripted 400" in str(caught.value)
    assert len(handler.seen) == 1


def test_client_gives_up_after_the_retries(scripted: tuple[type[_Script], str]) -> None:
    handler, url = scripted
    handler.answers = [500] * 10
    errors: list[str | None] = []
    client = HubClient(url, False, retries=2, backoff_max_s=0.05,
                       on_contact=lambda _ok, error: errors.append(error))
    with pytest.raises(HubUnavailable, match="HTTP 500"):
        client.held_buckets("t1")
    assert len(handler.seen) == 3 and errors and "HTTP 500" in str(errors[0])
    handler.answers = [404]
    assert client.held_buckets("t2") is None  # unknown transfer: the caller creates it
    assert client.held_buckets("t3") == {0, 2}


def test_client_unreachable_hub_is_unavailable() -> None:
    client = HubClient(f"http://127.0.0.1:{free_port()}", False, retries=1, backoff_max_s=0.05)
    with pytest.raises(HubUnavailable, match="ConnectError"):
        client.create_transfer({"transfer_id": "t"})


class _Held(http.server.BaseHTTPRequestHandler):
    """Holds each PUT until ``release`` is set, then answers 201; counts PUTs in progress.
    ``read_first``: read the body at once and hold only the answer (the PUT has been handed
    over and waits for the hub); otherwise leave the body unread meanwhile (the PUT is still
    on the wire, its sender blocked by TCP's window)."""

    release = threading.Event()
    lock = threading.Lock()
    in_progress = 0
    read_first = False
    peers: set[int] = set()
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        cls = type(self)
        length = int(self.headers.get("Content-Length") or 0)
        if cls.read_first:
            self.rfile.read(length)
        with cls.lock:
            cls.in_progress += 1
            cls.peers.add(self.client_address[1])
        cls.release.wait()
        if not cls.read_first:
            self.rfile.read(length)
        with cls.lock:
            cls.in_progress -= 1
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def _held_server(read_first: bool) -> tuple[http.server.ThreadingHTTPServer, type[_Held]]:
    handler = type("Held", (_Held,), {"release": threading.Event(), "lock": threading.Lock(),
                                      "in_progress": 0, "peers": set(),
                                      "read_first": read_first})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    serve_in_thread(server)
    return server, handler


# A body the kernel cannot take at once: its sender stays blocked until the server reads.
ON_THE_WIRE = 4 << 20


def test_puts_share_a_few_connections_and_urgent_ones_go_first() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.peers import wait_for

    server, handler = _held_server(read_first=False)
    client = HubClient(f"http://127.0.0.1:{server.server_address[1]}", False,
                       max_connections=3)
    try:
        with ThreadPoolExecutor(9) as pool:
            routine = [pool.submit(client.put_bucket, f"t{n}", 0, b"r" * ON_THE_WIRE)
                       for n in range(8)]
            # Routine PUTs take 2 of the 3 slots; the 6 others wait for one.
            wait_for(lambda: handler.in_progress == 2 and client.slots.waiting == 6, 10,
                     what="2 routine PUTs on the wire, 6 waiting")
            urgent = pool.submit(client.put_bucket, "u", 0, b"u" * ON_THE_WIRE, True)
            wait_for(lambda: handler.in_progress == 3, 10, what="the urgent PUT in the last slot")
            handler.release.set()
            assert urgent.result().status == 201
            assert [f.result().status for f in routine] == [201] * 8
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    assert client.slots.peak == 3
    assert len(handler.peers) <= 6  # TCP connections opened in all (the pool: 2 x 3)


def test_a_put_handed_over_frees_its_slot_while_it_waits_for_the_answer() -> None:
    """The slot bounds the PUTs *sending*: one whose body is all handed to the kernel waits
    for the hub's answer (its commit) on its own connection while the next PUT sends."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.peers import wait_for

    server, handler = _held_server(read_first=True)
    in_flight = [0]
    client = HubClient(f"http://127.0.0.1:{server.server_address[1]}", False,
                       max_connections=3,
                       on_inflight=lambda delta: in_flight.__setitem__(0, in_flight[0] + delta))
    try:
        with ThreadPoolExecutor(4) as pool:
            puts = [pool.submit(client.put_bucket, f"t{n}", 0, b"h" * 1000) for n in range(4)]
            # 4 bodies received with 2 routine slots: each slot was given back once its body
            # was handed over; the 4 answers are still awaited, and the PUTs still in flight.
            wait_for(lambda: handler.in_progress == 4, 10, what="4 bodies read, answers held")
            assert client.slots.in_use == 0
            assert in_flight[0] == 4000
            handler.release.set()
            assert [f.result().status for f in puts] == [201] * 4
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    assert in_flight[0] == 0
    assert client.slots.peak <= 2
    assert len(handler.peers) == 4  # one connection per PUT awaiting its answer


def _pacing_rates(client: HubClient) -> list[int]:
    """SO_MAX_PACING_RATE of every open connection, as the kernel reports it."""
    from appliance.transfer.pacing import SO_MAX_PACING_RATE

    return sorted(sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE)
                  for sock in list(client.pacer._sockets) if sock.fileno() >= 0)


def test_connections_are_paced_under_the_link_rate_shared_by_the_puts_on_the_wire() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.peers import wait_for

    server, handler = _held_server(read_first=False)
    client = HubClient(f"http://127.0.0.1:{server.server_address[1]}", False,
                       max_connections=4, link_mbps=40)
    full = int(client.pacer.HEADROOM * 40e6 / 8)
    try:
        with ThreadPoolExecutor(3) as pool:
            puts = [pool.submit(client.put_bucket, f"t{n}", 0, b"p" * ON_THE_WIRE)
                    for n in range(3)]
            wait_for(lambda: handler.in_progress == 3, 10, what="3 PUTs on the wire")
            assert _pacing_rates(client) == [full // 3] * 3  # the line shared by the three
            handler.release.set()
            assert [f.result().status for f in puts] == [201] * 3
        # None sending, nothing outstanding in the kernel: each may take the whole line.
        wait_for(lambda: _pacing_rates(client) == [full] * 3, 10, what="the caps lifted")
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    unpaced = HubClient("http://127.0.0.1:1", False)
    assert not unpaced.pacer.enabled  # the line's rate unknown: nothing is paced


def test_link_meter_counts_busy_time_only() -> None:
    from appliance.transfer.pacing import LinkMeter

    now = [100.0]
    meter = LinkMeter(clock=lambda: now[0])
    assert meter.mbps() is None  # nothing measured yet: auto packs at "default"
    with meter.measure(1_000_000):  # two PUTs overlapping: 2 MB in 1 s of busy time
        now[0] += 0.5
        with meter.measure(1_000_000):
            now[0] += 0.5
    now[0] += 30  # idle between studies: not a slow link
    assert meter.mbps() == pytest.approx(16.0)
    with contextlib.suppress(RuntimeError), meter.measure(5_000_000):  # failed: time counts
        now[0] += 1
        raise RuntimeError("cut")
    assert meter.mbps() == pytest.approx(8.0)


# --- receipts ------------------------------------------------------------------------------


def _signed_receipt() -> tuple[dict[str, object], bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    receipt: dict[str, object] = {
        "transfer_id": "t1", "study_uid": "1.2.3", "archived_at": "2026-11-23T14:00:00Z",
        "archive": "embedded",
        "instances": [{"sop_instance_uid": "1.2.3.4", "sha256": "ab" * 32}]}
    receipt["signature"] = base64.b64encode(
        key.sign(canonical_json(receipt), ec.ECDSA(hashes.SHA256()))).decode()
    return receipt, cert.public_bytes(serialization.Encoding.DER), key


def test_receipt_signature_verifies_and_any_change_is_refused() -> None:
    receipt, cert_der, _key = _signed_receipt()
    verify_receipt(receipt, cert_der)
    forged = json.loads(json.dumps(receipt))
    forged["instances"][0]["sha256"] = "cd" * 32
    with pytest.raises(ReceiptInvalid, match="bad signature"):
        verify_receipt(forged, cert_der)
    unsigned = {k: v for k, v in receipt.items() if k != "signature"}
    with pytest.raises(ReceiptInvalid, match="no valid base64 signature"):
        verify_receipt(unsigned, cert_der)
    _other, other_cert, _ = _signed_receipt()
    with pytest.raises(ReceiptInvalid):
        verify_receipt(receipt, other_cert)  # signed by another key than the hub's


# --- stowrs: credentials on the wire, and the per-instance answer --------------------------


@pytest.mark.parametrize("credentials, expected", [
    ({"bearer_token": "t0ken"}, "Bearer t0ken"),
    ({"username": "pas", "password": "s3cret"},
     "Basic " + base64.b64encode(b"pas:s3cret").decode()),
    ({}, None),
])
def test_stowrs_sends_the_configured_credentials(scripted: tuple[type[_Script], str],
                                                 credentials: dict[str, str],
                                                 expected: str | None) -> None:
    from appliance.config import StowRsDestination
    from appliance.dispatch.target_types.stowrs import StowRsTarget

    handler, url = scripted
    target = StowRsTarget("archive", StowRsDestination(kind="stowrs", url=url, **credentials))
    with target._client() as http:
        http.post(f"{url}/studies", content=b"")
    assert handler.auth == [expected]


def test_stow_response_per_instance() -> None:
    from appliance.dispatch.target_types.stowrs import parse_stow_response

    answer = {
        "00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3.1"]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.3.2"]}}]},
        "00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3.3"]},
             "00081197": {"vr": "US", "Value": [0xC000]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}]},
    }
    accepted, refused = parse_stow_response(answer)
    assert accepted == {"1.2.3.1", "1.2.3.2"}
    assert refused == {"1.2.3.3": 0xC000, "1.2.3.4": 0xC000}  # no reason: cannot process
    assert parse_stow_response([answer]) == (accepted, refused)
    assert parse_stow_response("garbage") == (set(), {})


def test_bucket_sizes_cut_small_studies_in_two_on_a_slow_line_and_start_big_ones_small(
        ) -> None:
    from appliance.dispatch.target_types.hub import FIRST_BUCKET_BYTES, bucket_sizes
    from appliance.transfer.pack import PackItem, plan_buckets

    mib = 1 << 20
    ct_study = [PackItem(f"1.2.{n}", Path("/dev/null"), 540_000, "0" * 64) for n in range(3)]
    size = sum(i.size for i in ct_study)
    target, first = bucket_sizes(size, 2 * mib, line_mbps=20)
    assert (target, first) == (FIRST_BUCKET_BYTES, None)
    assert [len(p.entries) for p in plan_buckets(ct_study, target, first)] == [1, 1, 1]
    assert bucket_sizes(size, 2 * mib, line_mbps=100) == (2 * mib, None)  # fast: one bucket
    assert bucket_sizes(size, 2 * mib) == (2 * mib, None)  # the line's rate unknown: as is
    assert bucket_sizes(3 * mib, 2 * mib, line_mbps=20) == (3 * mib // 2, None)  # two halves
    assert bucket_sizes(3 * mib, 6 * mib, line_mbps=4) == (3 * mib // 2, None)
    assert bucket_sizes(100_000, 6 * mib, line_mbps=4) == (6 * mib, None)  # 0.2 s: one bucket
    assert bucket_sizes(45 * mib, 2 * mib, 20) == (2 * mib, FIRST_BUCKET_BYTES)  # MR: as before


def test_pacer_counts_connections_with_unsent_bytes_until_the_kernel_sent_them() -> None:
    """A PUT whose body is handed over no longer counts as sending, but its last bytes may
    still wait in the kernel: the pacer reads that (TCP_INFO) and shares the line with those
    connections until they are sent. Real sockets: a receiver that does not read keeps the
    sender's bytes unsent."""
    from appliance.transfer.pacing import Pacer, bytes_unsent
    from tests.support.peers import wait_for

    pacer = Pacer(40)
    full = int(pacer.HEADROOM * 40e6 / 8)
    server = socket.create_server(("127.0.0.1", 0))
    senders, receivers = [], []
    try:
        for _ in range(2):
            sender = socket.create_connection(server.getsockname())
            receivers.append(server.accept()[0])
            pacer.add(sender)
            sender.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # until the kernel takes no more: the receiver reads nothing
                    sender.send(b"u" * 65536)
            senders.append(sender)
        assert all(bytes_unsent(s) > 0 for s in senders)
        with pacer.sending():  # a PUT starts and ends: the watcher polls from then on
            pass
        wait_for(lambda: pacer.busy == 2, 10, what="two connections with unsent bytes")
        assert pacer.rate() == full // 2 and _rates(senders) == [full // 2] * 2
        for receiver in receivers:  # drain: the kernel sends the rest
            receiver.setblocking(False)

        def drained() -> bool:
            for receiver in receivers:
                with contextlib.suppress(BlockingIOError):
                    while receiver.recv(1 << 20):
                        pass
            return pacer.busy == 0

        wait_for(drained, 10, what="nothing left unsent")
        wait_for(lambda: _rates(senders) == [full] * 2, 10, what="the whole line again")
    finally:
        for sock in [*senders, *receivers, server]:
            sock.close()


def _rates(sockets: list[socket.socket]) -> list[int]:
    from appliance.transfer.pacing import SO_MAX_PACING_RATE

    return sorted(s.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE) for s in sockets)
