"""Tiny network probes for validating the emulated link (ping may be missing on the machines).

Owns: a UDP echo server and client (round-trip time) and a TCP sink and source (the
throughput of a single stream). Run inside a namespace with ``ip netns exec``; each prints one
JSON line. Touches nothing but its own sockets.

    python netprobe.py udp-echo ADDR PORT
    python netprobe.py udp-ping ADDR PORT COUNT
    python netprobe.py tcp-sink ADDR PORT          (one connection; prints bytes and timing)
    python netprobe.py tcp-source ADDR PORT SECONDS
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time


def udp_echo(addr: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    print(json.dumps({"listening": port}), flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def udp_ping(addr: str, port: int, count: int) -> None:
    """Send ``count`` probes one after the other; a lost probe is counted, not retried."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    rtts: list[float] = []
    lost = 0
    for seq in range(count):
        payload = seq.to_bytes(4, "big") + b"x" * 60
        sent = time.perf_counter()
        sock.sendto(payload, (addr, port))
        try:
            while True:
                data, _ = sock.recvfrom(2048)
                if data[:4] == payload[:4]:
                    rtts.append((time.perf_counter() - sent) * 1000)
                    break
        except TimeoutError:
            lost += 1
    print(json.dumps({"count": count, "lost": lost,
                      "min_ms": min(rtts) if rtts else None,
                      "median_ms": statistics.median(rtts) if rtts else None,
                      "max_ms": max(rtts) if rtts else None}), flush=True)


def tcp_sink(addr: str, port: int) -> None:
    """Accept one connection, read to EOF; report bytes per second-long slot from first byte."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, port))
    server.listen(1)
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = server.accept()
    total = 0
    first = last = 0.0
    per_second: list[int] = []
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        now = time.perf_counter()
        if not first:
            first = now
        last = now
        slot = int(now - first)
        while len(per_second) <= slot:
            per_second.append(0)
        per_second[slot] += len(data)
        total += len(data)
    print(json.dumps({"bytes": total, "seconds": last - first, "per_second": per_second}),
          flush=True)


def tcp_source(addr: str, port: int, seconds: float) -> None:
    sock = socket.create_connection((addr, port), timeout=30)
    chunk = b"\0" * (256 * 1024)
    sent = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sock.sendall(chunk)
        sent += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the sink to close: everything has been received
    sock.close()
    print(json.dumps({"sent": sent}), flush=True)


def main(argv: list[str]) -> None:
    mode, addr, port = argv[0], argv[1], int(argv[2])
    if mode == "udp-echo":
        udp_echo(addr, port)
    elif mode == "udp-ping":
        udp_ping(addr, port, int(argv[3]))
    elif mode == "tcp-sink":
        tcp_sink(addr, port)
    elif mode == "tcp-source":
        tcp_source(addr, port, float(argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
