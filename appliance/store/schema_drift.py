"""A database's schema against the one its migrations make: found, and where safe, put right.

Owns: comparing ``sqlite_master`` of a database with that of a fresh database built in
memory from the same migration list, and bringing the derived objects (indexes, triggers,
views) to the reference's definition. May not touch: rows (a table that differs is said,
never rebuilt here), the migrations themselves (:mod:`appliance.store.schema`).

Why: the migration runner trusts ``PRAGMA user_version`` alone. A database made by a build
whose migration N said something else (a development build, a migration edited before it
was released) carries that difference for ever, unseen: an appliance whose
``patients_key`` index was the older one (``... OR issuer != ''``) refused every C-STORE
after the upgrade ("ON CONFLICT clause does not match any PRIMARY KEY or UNIQUE
constraint") while ``pas doctor`` said "database ok". Indexes, triggers and views hold no
data of their own: recreated as this version defines them, nothing is lost. A table's
columns are data: one that differs stops the start, with the difference named.
"""

from __future__ import annotations

import functools
import sqlite3
from dataclasses import dataclass, field

DERIVED = ("index", "trigger", "view")


class SchemaDiffers(RuntimeError):
    """A table's columns differ from what this version's migrations make: the database was
    written by another build. Nothing was changed."""


@dataclass
class Drift:
    """What differs: derived objects to recreate, create or drop, and tables whose columns
    differ (each a sentence)."""

    recreate: list[tuple[str, str]] = field(default_factory=list)  # (type, name)
    create: list[tuple[str, str]] = field(default_factory=list)
    drop: list[tuple[str, str]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.recreate or self.create or self.drop or self.tables)

    def derived_words(self) -> list[str]:
        return ([f"{kind} {name} redefined" for kind, name in self.recreate]
                + [f"{kind} {name} missing" for kind, name in self.create]
                + [f"{kind} {name} not this version's" for kind, name in self.drop])


def _split(script: str) -> list[str]:
    from appliance.store.db import _split_statements

    return _split_statements(script)


@functools.lru_cache(maxsize=4)
def reference(migrations: tuple[str, ...]) -> dict[tuple[str, str], tuple[str, str | None]]:
    """``(type, name) -> (table, sql)`` of a fresh database built from ``migrations``, and
    each table's columns under ``("columns", table)``. Built once per list (milliseconds)."""
    conn = sqlite3.connect(":memory:")
    try:
        for script in migrations:
            for statement in _split(script):
                conn.execute(statement)
        return _objects(conn)
    finally:
        conn.close()


def _objects(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, str | None]]:
    objects: dict[tuple[str, str], tuple[str, str | None]] = {}
    for kind, name, table, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "WHERE name NOT LIKE 'sqlite_%'").fetchall():
        objects[(kind, name)] = (table, sql)
        if kind == "table":
            columns = [row[1] for row in conn.execute(f'PRAGMA table_info("{name}")')]
            objects[("columns", name)] = (name, ",".join(columns))
    return objects


def find(conn: sqlite3.Connection, migrations: list[str]) -> Drift:
    """How the schema behind ``conn`` differs from ``migrations``' (read only)."""
    wanted = reference(tuple(migrations))
    held = _objects(conn)
    drift = Drift()
    for (kind, name), (_table, sql) in wanted.items():
        if kind in DERIVED:
            if (kind, name) not in held:
                drift.create.append((kind, name))
            elif held[(kind, name)][1] != sql:
                drift.recreate.append((kind, name))
        elif kind == "columns":
            if ("columns", name) not in held:
                drift.tables.append(f"table {name} missing")
            elif held[("columns", name)][1] != sql:
                drift.tables.append(f"table {name} has columns ({held[('columns', name)][1]}),"
                                    f" this version's ({sql})")
    drift.drop = [key for key in held if key[0] in DERIVED and key not in wanted]
    return drift


def put_right(conn: sqlite3.Connection, migrations: list[str]) -> Drift:
    """Recreate, create or drop the derived objects that differ, in the caller's
    transaction; raise :class:`SchemaDiffers` (the caller rolls back) when a table does.
    Returns what was found (empty: nothing to do)."""
    drift = find(conn, migrations)
    if drift.tables:
        raise SchemaDiffers("; ".join(drift.tables))
    wanted = reference(tuple(migrations))
    for kind, name in drift.drop + drift.recreate:
        conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
    # Indexes before triggers and views: a trigger may rely on an index's name (INDEXED BY).
    for kind, name in sorted(drift.recreate + drift.create, key=lambda key: DERIVED.index(key[0])):
        sql = wanted[(kind, name)][1]
        if sql:
            conn.execute(sql)
    return drift
