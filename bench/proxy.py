"""`make bench-proxy`: the uplink straight to the hub against the same uplink through the
hospital's HTTP proxy (``hub.proxy``: Debian's tinyproxy, CONNECT tunnels), same machine,
same run, rounds alternated.

For the real CT and MR sets: storescu -> PAS -> ``pas hub run`` (embedded archive), each
round a new enrolled site (the same instances are archived again from another site: the
same bytes, accepted). PAS's time runs from the first job's creation to the last job's end
(its own database): "study stable" to "region confirmed it". Every instance must be
confirmed; every tunnel the proxy opened must be to the hub. Loopback, no WAN: what the
proxy costs itself (a copy of every byte through one more process), which a real WAN's
rate hides. Owns nothing but its printout.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.http_proxy import TinyProxy  # noqa: E402
from tests.support.hub import HubProcess, enroll  # noqa: E402
from tests.support.peers import CT_DIR, MR_DIR, PasProcess, storescu, wait_for  # noqa: E402
from tests.support.peers import read_rows as rows  # noqa: E402

SETS = {"CT": CT_DIR, "MR": MR_DIR}
BASE_ENV = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_QUEUE__WORKERS": "4",
            "PAS_STUDY__STABLE_AFTER_S": "2", "PAS_PREFETCH__ON_ARRIVAL": "false"}


def run(hub: HubProcess, home: Path, folder: Path, env: dict[str, str]) -> float:
    """One set through the hub; seconds from the first job's creation to the last's end."""
    enroll(hub, home, home.name.upper())
    pas = PasProcess(home, {**BASE_ENV, **env}).start()
    try:
        storescu(folder, pas.port)
        db = home / "pas.sqlite"
        count = len(rows(db, "SELECT id FROM instances"))

        def settled() -> bool:
            confirmed = rows(db, "SELECT count(*) AS n FROM instances "
                             "WHERE confirmed_at IS NOT NULL")[0]["n"]
            busy = rows(db, "SELECT count(*) AS n FROM jobs WHERE state IN "
                        "('pending', 'running')")[0]["n"]
            return bool(confirmed == count and busy == 0)

        wait_for(settled, 600, interval=0.1, what=f"every instance confirmed ({pas.log_path})")
        jobs = rows(db, "SELECT * FROM jobs")
        failed = [j["last_error"] for j in jobs if j["state"] != "done"]
        if failed:
            raise RuntimeError(f"jobs failed: {failed[:3]}")
        return float(max(j["finished_at"] for j in jobs) - min(j["created_at"] for j in jobs))
    finally:
        pas.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="CT,MR")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    hub = HubProcess(scratch / "hub").init().start()
    proxy = TinyProxy(scratch / "proxy", "127.0.0.1", "127.0.0.1", [hub.port],
                      ("bench", "bench-secret")).start()
    proxied = {"PAS_HUB__PROXY": proxy.url, "PAS_HUB__PROXY_USERNAME": "bench",
               "PAS_HUB__PROXY_PASSWORD": "bench-secret"}
    lines = []
    try:
        for name in [n for n in args.sets.split(",") if n]:
            direct, through = [], []
            for round_ in range(args.rounds):
                direct.append(run(hub, scratch / f"direct-{name}-{round_}", SETS[name], {}))
                before = len(proxy.tunnels())
                through.append(run(hub, scratch / f"proxy-{name}-{round_}", SETS[name],
                                   proxied))
                tunnels = proxy.tunnels()[before:]
                if not tunnels or set(tunnels) != {f"localhost:{hub.port}"}:
                    raise RuntimeError(f"the proxy's tunnels: {tunnels}")
            lines.append(f"{name:4} {min(direct):10.2f} {min(through):14.2f} "
                         f"{min(direct) / min(through):8.2f}x   "
                         f"direct {', '.join(f'{s:.2f}' for s in direct)}; "
                         f"proxy {', '.join(f'{s:.2f}' for s in through)}")
    finally:
        proxy.stop()
        hub.kill()
    print(f"\nbench-proxy {datetime.date.today()} on {platform.node()} "
          f"({platform.processor() or platform.machine()}), loopback, best of {args.rounds}")
    print(f"{'set':4} {'direct s':>10} {'via proxy s':>14} {'ratio':>9}   (rate via proxy / "
          "direct; every round)")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
