"""Checks shared by the fault-injection tests: what "nothing lost, nothing doubled" means.

Every check reads the real spool and the real SQLite file the daemon left behind.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import struct
from pathlib import Path
from typing import Any

from appliance.store.spool import Spool


def dataset_bytes(content: bytes) -> bytes:
    """The bytes after the file meta group (what travelled in P-DATA): the part PAS must keep
    byte for byte; the meta is rewritten by the receiver."""
    assert content[128:132] == b"DICM", "not a Part 10 file"
    # (0002,0000) UL, explicit VR little endian: value at offset 140.
    assert content[132:136] == b"\x02\x00\x00\x00"
    group_length = struct.unpack("<I", content[140:144])[0]
    return content[144 + group_length:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_successes(storescu_output: str) -> list[str]:
    """Files whose C-STORE response storescu saw as Success (``-v`` output, in order)."""
    succeeded, current = [], None
    for line in storescu_output.splitlines():
        match = re.match(r"I: Sending file: (.+)$", line)
        if match:
            current = match.group(1)
        elif "Received Store Response (Success)" in line and current:
            succeeded.append(current)
            current = None
    return succeeded


def sop_uid_of(path: Path | str) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def spool_state(home: Path) -> dict[str, Any]:
    """Rows, files and every inconsistency between them, read from disk."""
    spool_root = home / "spool"
    conn = sqlite3.connect(home / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT sop_instance_uid, path, size, sha256, is_current "
                        "FROM instances").fetchall()
    conn.close()
    files = {str(p.relative_to(spool_root)) for p in spool_root.rglob("*.dcm")
             if p.relative_to(spool_root).parts[0] not in ("tmp", "quarantine")}
    indexed = {r["path"] for r in rows}
    bad_hash = []
    for relative in files:
        data = (spool_root / relative).read_bytes()
        if sha256(data) != Path(relative).stem:
            bad_hash.append(relative)
    current = [r["sop_instance_uid"] for r in rows if r["is_current"]]
    return {
        "rows": len(rows),
        "by_sop": {r["sop_instance_uid"]: r for r in rows if r["is_current"]},
        "duplicates": len(current) - len(set(current)),
        "files": len(files),
        "orphans": sorted(files - indexed),
        "missing": sorted(indexed - files),
        "bad_hash": sorted(bad_hash),
        # Empty ones are created ahead for the next writes (spool.py's _TempFiles).
        "temp_files": sorted(str(p) for p in (spool_root / "tmp").glob("*") if p.stat().st_size),
    }


def assert_consistent(home: Path) -> dict[str, Any]:
    state = spool_state(home)
    assert state["duplicates"] == 0, state
    assert state["orphans"] == [], f"orphan files: {state['orphans']}"
    assert state["missing"] == [], f"rows without files: {state['missing']}"
    assert state["bad_hash"] == [], f"half-written or damaged files: {state['bad_hash']}"
    assert state["temp_files"] == [], state["temp_files"]
    return state


def assert_kept_exactly(home: Path, sources: list[str]) -> None:
    """Every source whose success the sender saw is indexed and its dataset bytes are equal."""
    state = spool_state(home)
    for source in sources:
        original = Path(source).read_bytes()
        uid = sop_uid_of(source)
        row = state["by_sop"].get(uid)
        assert row is not None, f"LOST: {source} ({uid}) was acknowledged but is not indexed"
        kept = (home / "spool" / row["path"]).read_bytes()
        assert sha256(kept) == row["sha256"]
        if sha256(dataset_bytes(kept)) != sha256(dataset_bytes(original)):
            # storescu re-encodes some files on the way (undefined-length sequences become
            # defined-length): then every element must still be equal, pixels bit for bit.
            assert _same_dataset(kept, original), f"{source}: content differs"


def _same_dataset(kept: bytes, original: bytes) -> bool:
    from io import BytesIO

    from pydicom import dcmread

    a, b = dcmread(BytesIO(kept)), dcmread(BytesIO(original))
    pixels_equal = sha256(a.get("PixelData", b"") or b"") == sha256(b.get("PixelData", b"") or b"")
    return bool(pixels_equal and a == b)


def new_spool(home: Path) -> Spool:
    return Spool(home / "spool", fsync=True)
