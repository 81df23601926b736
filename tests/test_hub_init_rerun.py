"""``pas hub init`` interrupted half-way is completed by running it again; a hub in use never
has its CA or keys rebuilt.

Found in review (invariant 6): init wrote the CA first and the other files one by one, and
made the database last. A Ctrl-C, a kill or a full disk after ``ca.crt`` left a hub that
``pas hub init`` called "already initialised", ``pas hub token`` "no database ... pas hub init
creates it", ``pas hub config check`` "lacks transfer.key (put them back from the last hub
backup)" of a hub that never had a backup: only deleting the home by hand got out of it.
Now everything is made in ``.init-partial/``, the database before ``ca.crt`` goes in, last
(appliance/hub/pki.py ``HubPKI.init``, appliance/cli/hub.py ``hub_init``).

Real CLI; the interruption is a KeyboardInterrupt (a Ctrl-C) raised inside the real command
at a chosen write or rename.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.hub.pki import HubPKI
from appliance.store.hub import add_token, open_hub_db
from tests.support.hub import HubProcess

FILES = ("ca.key", "ca.crt", "server.key", "server.crt", "transfer.key", "transfer.pub")


def _interrupted_init(home: Path, patched: str, at: int) -> subprocess.CompletedProcess[str]:
    """``pas hub init`` in a new interpreter, Ctrl-C at the ``at``-th call of ``patched``
    (``write_private``: a key or certificate file; ``replace``: a rename into the home)."""
    target = "pki" if patched == "write_private" else "pki.os"
    script = textwrap.dedent(f"""
        import os, sys
        import appliance.hub.pki as pki
        real, calls = {target}.{patched}, [0]
        def interrupted(*args, **kwargs):
            if {patched == "replace"} and os.path.dirname(args[1]) != {str(home)!r}:
                return real(*args, **kwargs)  # a write's own rename, not a move in
            calls[0] += 1
            if calls[0] == {at}:
                raise KeyboardInterrupt  # a Ctrl-C here
            return real(*args, **kwargs)
        {target}.{patched} = interrupted
        from appliance.cli.main import main
        sys.argv = ["pas", "hub", "init"]
        main()
    """)
    env = {**os.environ, "PAS_HUB_HOME": str(home)}
    env.pop("PAS_HUB_CONFIG", None)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent.parent)


def _assert_complete(hub: HubProcess) -> None:
    for name in FILES:
        assert stat.S_IMODE((hub.home / name).stat().st_mode) == 0o600, name
    assert not (hub.home / ".init-partial").exists()
    token = hub.token("SITE-A", cli=True)
    assert token.endswith("." + HubPKI(hub.home).ca_fingerprint()), token


@pytest.mark.parametrize(("patched", "at"), [
    ("write_private", 5),  # the transfer key being written: the CA, the server's made
    ("replace", 3),        # moving the files in: ca.key and server.key in, the rest not
], ids=["while-writing", "while-moving-in"])
def test_an_interrupted_init_is_completed_by_running_it_again(
        tmp_path: Path, patched: str, at: int) -> None:
    hub = HubProcess(tmp_path / "hub")
    first = _interrupted_init(hub.home, patched, at)
    assert first.returncode == 130, first.stdout + first.stderr  # as a Ctrl-C ends it
    left = sorted(p.name for p in hub.home.iterdir())
    again = hub.cli("init", check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "hub initialised in" in again.stdout
    # Interrupted, the home had no ca.crt: no command took it for an initialised hub.
    assert left == [".init-partial", *(["ca.key", "hub.sqlite", "server.key"]
                                       if patched == "replace" else [])], left
    _assert_complete(hub)
    refused = hub.cli("init", check=False)  # and now it is initialised, for good
    assert refused.returncode == 1 and "already initialised" in refused.stderr


def test_a_home_an_older_init_left_half_made_is_completed_with_its_ca(tmp_path: Path) -> None:
    """What the older version left: the CA and the server certificate, no transfer key, no
    database. Nothing can have been issued with it (a token needs the database): the CA is
    kept, the rest made."""
    hub = HubProcess(tmp_path / "hub")
    pki = HubPKI(hub.home)
    pki.init()
    fingerprint = pki.ca_fingerprint()
    for name in ("transfer.key", "transfer.pub"):
        (hub.home / name).unlink()
    done = hub.cli("init", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert "completed (an earlier pas hub init was interrupted): made transfer.key, " \
           f"transfer.pub; CA fingerprint {fingerprint}" in said, said
    _assert_complete(hub)


def test_a_hub_that_issued_tokens_is_never_rebuilt(tmp_path: Path) -> None:
    """A hub in use that lost a file (or its ca.crt) is refused, its CA and keys left as
    they are: new ones would cut off every appliance pinning its CA or holding its
    transfer key."""
    hub = HubProcess(tmp_path / "hub").init()
    db = open_hub_db(hub.home / "hub.sqlite")
    try:
        add_token(db, "SITE-A", "0" * 64, 2e9)
    finally:
        db.close()
    ca_key = (hub.home / "ca.key").read_bytes()
    (hub.home / "transfer.key").unlink()
    refused = hub.cli("init", check=False)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "transfer.key missing from a hub that has issued" \
        in said, said
    assert not (hub.home / "transfer.key").exists()
    (hub.home / "ca.crt").rename(hub.home / "ca.crt.aside")
    refused = hub.cli("init", check=False)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "put ca.crt back from the last hub backup" in said, said
    assert (hub.home / "ca.key").read_bytes() == ca_key
    assert not (hub.home / "ca.crt").exists()
