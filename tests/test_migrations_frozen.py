"""A migration, once on main, is never edited: a change is a new migration.

Why: the runner counts migrations by ``PRAGMA user_version``. An index made by a build whose
migration N said something else keeps that difference: a migration 17 edited after it had
run (its ``patients_key`` index redefined) left such an index refusing every C-STORE after
the upgrade. ``appliance/store/schema_drift.py`` now puts derived objects right at the
start, but a table's difference it can only refuse, and a data change (a backfill, a
rewrite) it cannot see at all. Here each migration's SHA-256 is frozen: editing one fails
this test; a new migration appends its own line (the failure prints it).
"""

from __future__ import annotations

import hashlib

import pytest

from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.store.schema import MIGRATIONS

FROZEN_MIGRATIONS = [
    "aed6eb0ddb64445a",  # 1
    "67929880d5503de9",  # 2
    "3b04c5f3dc583805",  # 3
    "b3143609a9d49cb7",  # 4
    "9ba778be021813d2",  # 5
    "1d67840de34cda05",  # 6
    "475c8b626d10c63c",  # 7
    "2e9857bd3f2bbf84",  # 8
    "61eeeb2b5078cf8e",  # 9
    "4025a01ffe537d18",  # 10
    "32ce143d3b9a4e83",  # 11
    "34a66e346f6e682e",  # 12
    "1c235e8d6cbba085",  # 13
    "b2804f1919b22b98",  # 14
    "a7cf03afc8c45556",  # 15
    "38e998013ff3ae95",  # 16
    "a5d35a1ab6c08c28",  # 17
    "59b33b8897e39c71",  # 18
    "07f9068cda8a11f2",  # 19
    "2919a52571f62c35",  # 20
    "d630e8abefe53bd7",  # 21
    "b0741f2cdadc7a97",  # 22
    "19940f1c141d53e7",  # 23
    "aae91d38bcb5223e",  # 24
    "618604cfd2e2949f",  # 25
    "9a35d068dbd45654",  # 26
    "55beed275ee6b5c5",  # 27
    "a1da7d8943623c94",  # 28
    "5983472f22f8ca4c",  # 29
    "fabd8f96ac56a661",  # 30: rewritten before it shipped (no row rewritten: audit_chain_start)
]

FROZEN_HUB_MIGRATIONS = [
    "a5fee95284769ad3",  # 1
    "3b4980f1de2eb4a9",  # 2
    "a26ce5482360ad31",  # 3
    "9e592a160738ec25",  # 4
    "09c42d834ea39ec2",  # 5
    "1508a6cfa51969b7",  # 6
    "8e91f3f6911d6f6d",  # 7
    "0b306e52db2662a8",  # 8
    "c28553c48d45b8e2",  # 9
    "101ef9817f7228c0",  # 10
    "54dbb2787118544d",  # 11
    "d49b74b177b2fbfe",  # 12
    "d2962464fe35445f",  # 13
    "f07e3b6233313d95",  # 14
    "ccaec7b7c66f732c",  # 15
]


def _digest(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()[:16]


@pytest.mark.parametrize(("name", "migrations", "frozen"), [
    ("appliance/store/schema.py MIGRATIONS", MIGRATIONS, FROZEN_MIGRATIONS),
    ("appliance/store/hub_schema.py HUB_MIGRATIONS", HUB_MIGRATIONS, FROZEN_HUB_MIGRATIONS),
], ids=["appliance", "hub"])
def test_no_migration_on_main_was_edited(name: str, migrations: list[str],
                                         frozen: list[str]) -> None:
    edited = [number for number, (script, digest)
              in enumerate(zip(migrations, frozen, strict=False), 1)
              if _digest(script) != digest]
    assert not edited, (f"{name}: migration(s) {edited} edited after they were frozen; "
                        "write a new migration instead (an index migrated by the old text "
                        "keeps it)")
    assert len(migrations) >= len(frozen), f"{name}: a frozen migration was removed"
    new = [f'    "{_digest(script)}",  # {number}'
           for number, script in enumerate(migrations[len(frozen):], len(frozen) + 1)]
    assert not new, f"{name}: new migration(s); freeze them here:\n" + "\n".join(new)
