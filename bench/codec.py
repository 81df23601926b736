"""`make bench-codec`: compression ratio and speed of the bucket packer, per level, on the real
CT and MR sets, next to the baselines measured in the same run (zstd of each file alone,
zstd over the whole bucket without JPEG-LS) and the lossless limit DESIGN.md states.

Owns nothing but its printout. Every packed bucket is unpacked and every file's SHA-256
checked, so a figure can never come from a wrong result.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.transfer import jls, levels  # noqa: E402
from appliance.transfer.pack import (  # noqa: E402
    DEFAULT_TARGET,
    PackItem,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"CT": DATA / "ct-covid19-ny-sbu", "MR": DATA / "mr-toshiba-dti"}
LIMIT = {"CT": "3.3x", "MR": "~11x"}  # DESIGN.md, "lossless limit"


def load(folder: Path) -> tuple[list[PackItem], dict[str, bytes]]:
    items, originals = [], {}
    for path in sorted(folder.glob("*.dcm")):
        data = path.read_bytes()
        items.append(PackItem(path.name, path, len(data), hashlib.sha256(data).hexdigest()))
        originals[path.name] = data
    return items, originals


def per_file_zstd(originals: dict[str, bytes], level: int) -> tuple[int, float, float]:
    """(packed bytes, wall seconds, CPU seconds) compressing each file alone."""
    compressor = zstandard.ZstdCompressor(level=level)
    start, cpu0 = time.perf_counter(), time.thread_time()
    packed = sum(len(compressor.compress(data)) for data in originals.values())
    return packed, time.perf_counter() - start, time.thread_time() - cpu0


def solid_zstd(originals: dict[str, bytes], level: int) -> tuple[int, float, float]:
    """zstd over ~6 MiB runs of concatenated files: the bucket without JPEG-LS."""
    compressor = zstandard.ZstdCompressor(level=level)
    start, cpu0 = time.perf_counter(), time.thread_time()
    packed, run = 0, bytearray()
    for data in originals.values():
        if run and len(run) + len(data) > DEFAULT_TARGET:
            packed += len(compressor.compress(bytes(run)))
            run = bytearray()
        run += data
    packed += len(compressor.compress(bytes(run)))
    return packed, time.perf_counter() - start, time.thread_time() - cpu0


def row(name: str, label: str, ratio: float, per_cpu_s: float, wall: float, cores: float,
        unpack: str = "") -> str:
    """One table line. ``fills``: the link (Mbit/s) whose rate the packer's OUTPUT matches
    with the appliance's two cores busy packing: 2 x MB/cpu-s / ratio x 8."""
    fills = 2 * per_cpu_s / ratio * 8
    return (f"{name:<4}{label:<38}{ratio:>6.2f}x{per_cpu_s:>10.1f}{fills:>10.0f}"
            f"{wall:>10.1f}{cores:>7.2f}{unpack:>9}")


def run_level(items: list[PackItem], level: str, parallel: int) -> dict[str, float]:
    """Pack every bucket (``parallel`` buckets at once, as the uplink may), then unpack and
    check each file's SHA-256."""
    plans = plan_buckets(items)
    cpu0, start = time.process_time(), time.perf_counter()
    if parallel > 1:
        with ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(lambda plan: pack_bucket(plan, level), plans))
    else:
        results = [pack_bucket(plan, level) for plan in plans]
    pack_s, pack_cpu = time.perf_counter() - start, time.process_time() - cpu0
    start = time.perf_counter()
    pieces: dict[str, list[tuple[int, bytes]]] = {}
    for payload, _ in results:
        for piece in unpack_bucket(payload):
            pieces.setdefault(piece.sop_instance_uid, []).append((piece.offset, piece.data))
    unpack_s = time.perf_counter() - start
    for item in items:
        data = b"".join(d for _, d in sorted(pieces[item.sop_instance_uid]))
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise SystemExit(f"NOT EXACT: {item.path}")
    original = sum(s["original"] for _, s in results)
    return {
        "cpu_s": sum(s["cpu_us"] for _, s in results) / 1e6,
        "packed": sum(s["packed"] for _, s in results),
        "original": original,
        "pack_s": pack_s,
        "cpu": pack_cpu / pack_s,
        "unpack_s": unpack_s,
        "fallback": sum(s["jpegls_fallback"] for _, s in results),
    }


def gil_check() -> str:
    """How much Python work the main thread gets done while another thread JPEG-LS-encodes,
    through ctypes (GIL released) versus pyjpegls's wrapper (GIL held)."""
    import threading

    import _CharLS
    import numpy as np

    image = (np.arange(1024 * 1024, dtype=np.uint32) * 2654435761 % 4096).astype("<u2")
    samples = image.tobytes()

    def turns_per_second(encode: object | None) -> float:
        thread = threading.Thread(target=encode) if encode else None
        count, start = 0, time.perf_counter()
        if thread is None:
            while time.perf_counter() - start < 0.3:
                count += 1
        else:
            thread.start()
            while thread.is_alive():
                count += 1
            thread.join()
        return count / (time.perf_counter() - start)

    alone = turns_per_second(None)
    via_ctypes = turns_per_second(
        lambda: [jls.encode(samples, 1024, 1024, 1, 12, 0) for _ in range(3)])
    via_wrapper = turns_per_second(
        lambda: [_CharLS._encode(samples, 0, 0, 1024, 1024, 1, 12) for _ in range(3)])
    return (f"Python speed of the main thread while another thread encodes JPEG-LS: "
            f"{via_ctypes / alone:.0%} via ctypes, {via_wrapper / alone:.0%} via pyjpegls "
            f"(100%: the GIL is released)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="fast,default,max")
    parser.add_argument("--parallel", type=int, default=2, help="buckets packed at once")
    args = parser.parse_args()
    print(f"bench-codec  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"cores={os.cpu_count()}  load={os.getloadavg()[0]:.1f}  "
          f"JPEG-LS via {'ctypes (GIL released)' if jls.USING_CTYPES else 'pyjpegls'}")
    print(gil_check())
    header = (f"{'set':<4}{'method':<38}{'ratio':>7}{'MB/cpu-s':>10}{'fills':>10}"
              f"{'wall MB/s':>10}{'cores':>7}{'unpack':>9}")
    print(header)
    print(f"{'':<49}{'Mbit/s':>10}{'this run':>10}{'':>7}{'MB/s':>9}")
    print("-" * len(header))
    for name, folder in SETS.items():
        items, originals = load(folder)
        total = sum(len(d) for d in originals.values())
        for label, (packed, seconds, cpu) in (
            ("per-file zstd -3 (baseline)", per_file_zstd(originals, 3)),
            ("per-file zstd -19 (baseline)", per_file_zstd(originals, 19)),
            ("solid zstd -3, 6 MiB runs (baseline)", solid_zstd(originals, 3)),
        ):
            print(row(name, label, total / packed, total / cpu / 1e6, total / seconds / 1e6,
                      cpu / seconds))
        for level in args.levels.split(","):
            result = run_level(items, level, args.parallel)
            print(row(name, f"PAS {level} ({args.parallel} buckets at once)",
                      result["original"] / result["packed"],
                      result["original"] / result["cpu_s"] / 1e6,
                      result["original"] / result["pack_s"] / 1e6, result["cpu"],
                      f"{result['original'] / result['unpack_s'] / 1e6:.0f}")
                  + (f"  fallbacks={result['fallback']}" if result["fallback"] else ""))
        print(f"{name:<4}{'lossless limit (DESIGN.md)':<38}{LIMIT[name]:>7}")
        choice = ", ".join(f"{mbps} Mbit/s -> {levels.choose_level(mbps)}"
                           for mbps in (4, 20, 100, 300, 1000))
        print(f"{name:<4}level 'auto' from these measurements: {choice}")
        levels.reset()
    print("MB/cpu-s: original MB packed per CPU-second (PAS: summed over its threads), the "
          "figure that does not depend on the machine's load. fills: the link rate the packed "
          "output keeps up with on 2 cores (2 x MB/cpu-s / ratio, in Mbit/s; an estimate "
          "from CPU cost). wall MB/s and cores (CPU-s per wall-s): this run on this shared "
          "machine. unpack: the hub's side, one thread. Every file's SHA-256 is checked.")


if __name__ == "__main__":
    main()
