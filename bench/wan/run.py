"""``make bench-wan``: the same studies over the same emulated links, peer after peer.

Owns: the benchmark's plan (links x data sets x peers), its table on stdout and a markdown copy
in the scratch folder (pasted into docs/benchmarks.md by hand, with date, machine, command).
Creates and deletes its own namespaces, Orthancs and PAS processes; touches nothing else.

    python -m bench.wan.run            # the three links, CT and MR, every peer (< 20 min)
    python -m bench.wan.run --quick    # the 20 Mbit/s link only
    python -m bench.wan.run --links 20 --sets ct --peers storescu,pas
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.wan.link import LinkSpec, WanLink
from bench.wan.peers import Dataset, Result, run_archive_floor, run_orthanc_stow, run_storescu
from bench.wan.validate import Validation, validate
from tests.support.peers import CT_DIR, MR_DIR

LINKS = {
    "20": LinkSpec("20", mbit_s=20, rtt_ms=70, loss=0.001),
    "4": LinkSpec("4", mbit_s=4, rtt_ms=70, loss=0.005),
    "100": LinkSpec("100", mbit_s=100, rtt_ms=20, loss=0.0),
}
SETS = {"ct": ("CT 60 x 0.5 MB", CT_DIR), "mr": ("MR 520 x 86 kB", MR_DIR)}
# PAS's settings in this benchmark (printed with the results). The CT set is 20 studies of 3
# instances: one transfer per study, so parallel jobs matter as much as parallel buckets.
# pack_level "auto": the level follows the rate the uplink measures (its choice is printed).
# hub.link_mbps: the line's nominal rate, as the site's IT would write it (set per link below):
# the uplink paces its connections under it, which lets it use 6 connections (5 PUTs on the
# wire) without overrunning the router's one-BDP queue. Buckets of 2 MiB, 6 PUTs of a study
# at once: a many-bucket study (MR) reaches the regional archive in a steady flow of small
# buckets rather than in waves of big ones (MR at 20 Mbit/s 7.5-8.0x -> 8.0-8.1x, 2026-12-03).
# 12 queue workers: with a PUT's slot given back once its body is sent, enough studies must be
# ready (transfer created, first bucket packed) when a slot frees (CT: 20 studies).
PAS_ENV = {"PAS_QUEUE__WORKERS": "12", "PAS_HUB__PACK_LEVEL": "auto",
           "PAS_HUB__CONNECTIONS": "6", "PAS_HUB__BUCKET_MB": "2",
           "PAS_HUB__PARALLEL_BUCKETS": "6"}


def pas_env(spec: LinkSpec) -> dict[str, str]:
    """PAS's settings on one link: PAS_ENV, told the link's nominal rate."""
    return {"PAS_HUB__LINK_MBPS": f"{spec.mbit_s:g}", **PAS_ENV}


Runner = Callable[[WanLink, Dataset, Path, float], Result]


def _peers() -> dict[str, Runner]:
    peers: dict[str, Runner] = {"storescu": run_storescu, "stow": run_orthanc_stow,
                                "floor": run_archive_floor}
    try:
        from bench.wan.pas import run_pas
    except ImportError as exc:  # PAS's uplink not importable yet: run the peers alone
        print(f"(PAS not benchmarked: {exc})", file=sys.stderr)
    else:
        def pas(link: WanLink, ds: Dataset, scratch: Path, timeout: float) -> Result:
            return run_pas(link, ds, scratch, timeout, pas_env(link.spec))
        peers["pas"] = pas
    return peers


def table(results: list[Result], validations: dict[str, Validation]) -> str:
    lines = ["| link | measured link | set | peer | seconds | x link rate | wire up MB | "
             "wire down MB | PAS speed-up |", "|" + "---|" * 9]
    for r in results:
        v = validations[r.link.name]
        measured = f"rtt {v.rtt_median_ms:.0f} ms, 1 TCP {v.tcp_steady_mbit_s:.1f} Mbit/s"
        same = [o for o in results if o.link == r.link and o.dataset == r.dataset and o.ok]
        peers = [o for o in same if o.peer != "PAS" and o.wire_up]
        speedup = ""
        if r.peer == "PAS" and r.ok and peers:
            best = min(peers, key=lambda o: o.seconds)
            speedup = f"{best.seconds / r.seconds:.2f}x vs {best.peer}"
        status = "" if r.ok else f" (FAILED: {r.stored}/{r.dataset.instances} {r.note})"
        lines.append(
            f"| {r.link.label()} | {measured} | {r.dataset.name} | {r.peer}{status} | "
            f"{r.seconds:.1f} | {r.x_link:.2f}x | {r.wire_up / 1e6:.1f} | "
            f"{r.wire_down / 1e6:.2f} | {speedup} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 20 Mbit/s link only")
    parser.add_argument("--links", default=",".join(LINKS), help="of: " + ",".join(LINKS))
    parser.add_argument("--sets", default=",".join(SETS), help="of: " + ",".join(SETS))
    parser.add_argument("--peers", default="storescu,stow,pas,floor")
    parser.add_argument("--timeout", type=float, default=600, help="per transfer, seconds")
    parser.add_argument("--pas-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra PAS setting, e.g. PAS_HUB__PACK_LEVEL=fast (repeatable)")
    args = parser.parse_args(argv)
    PAS_ENV.update(item.split("=", 1) for item in args.pas_env)
    links = ["20"] if args.quick else args.links.split(",")
    available = _peers()
    peers = [p for p in args.peers.split(",") if p in available]
    datasets = [Dataset.load(SETS[s][0], SETS[s][1]) for s in args.sets.split(",")]
    for ds in datasets:
        print(f"{ds.name}: {ds.instances} instances, {ds.original_bytes / 1e6:.1f} MB")
    print(f"PAS settings: {PAS_ENV}, PAS_HUB__LINK_MBPS = the link's rate (others: defaults)")

    results: list[Result] = []
    validations: dict[str, Validation] = {}
    scratch = Path(tempfile.mkdtemp(prefix="pas-bench-wan-"))
    try:
        for name in links:
            spec = LINKS[name]
            with WanLink(spec) as link:
                v = validations[name] = validate(link)
                print(f"\nlink {spec.label()}: udp rtt min {v.rtt_min_ms:.1f} median "
                      f"{v.rtt_median_ms:.1f} ms; one TCP stream {v.tcp_steady_mbit_s:.2f} "
                      f"Mbit/s steady ({v.tcp_steady_mbit_s / spec.mbit_s:.0%} of the rate)",
                      flush=True)
                for ds in datasets:
                    for peer in peers:
                        folder = scratch / f"{name}-{ds.name[:2]}-{peer}"
                        try:
                            r = available[peer](link, ds, folder, args.timeout)
                        except Exception as exc:  # one failed row, not a lost run
                            r = Result(spec, ds, peer, float("nan"), 0, 0, 0,
                                       f"{type(exc).__name__}: {exc}"[:300])
                        results.append(r)
                        print(f"  {ds.name:16} {r.peer:16} {r.seconds:7.1f} s  "
                              f"{r.x_link:5.2f}x link  wire up {r.wire_up / 1e6:6.1f} MB"
                              f"{'  ' + r.note if r.ok else '  FAILED ' + r.note}",
                              flush=True)
                        shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    md = table(results, validations)
    header = (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
              f"{platform.node()}, 2 cores, `{' '.join(['make bench-wan', *sys.argv[1:]])}`, "
              f"PAS settings {PAS_ENV}")
    print("\n" + header + "\n\n" + md)
    out = Path(tempfile.gettempdir()) / "pas-bench-wan.md"
    out.write_text(header + "\n\n" + md + "\n")
    print(f"\n(markdown copy: {out})")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
