"""Inputs the fuzzers found, kept as plain regression tests (each failed before its fix)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from appliance.config import ConfigError, load_settings
from appliance.ingest.attributes import InvalidInstance
from appliance.ingest.receive import Receiver
from appliance.store.db import Database
from appliance.store.spool import Spool


def _with_vr(tag: bytes, new_vr: bytes) -> bytes:
    content = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
    position = content.index(tag)
    return content[:position + 4] + new_vr + content[position + 6:]


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(Database(tmp_path / "pas.sqlite"), Spool(tmp_path / "spool", fsync=False))


def test_unknown_vr_in_an_optional_element_is_filed_without_it(receiver: Receiver) -> None:
    # (0020,0011) SeriesNumber with the unknown VR "IL": pydicom raises NotImplementedError
    # when the value is read, which used to escape the receive path.
    received = receiver.receive_file(_with_vr(b"\x20\x00\x11\x00IS", b"IL"))
    row = receiver.db.query_one("SELECT series_number FROM series s JOIN instances i "
                                "ON i.series_fk = s.id WHERE i.id = ?", (received.instance_id,))
    assert row is not None and row["series_number"] is None


def test_unknown_vr_in_a_uid_is_refused_naming_it(receiver: Receiver) -> None:
    with pytest.raises(InvalidInstance, match="SeriesInstanceUID cannot be read"):
        receiver.receive_file(_with_vr(b"\x20\x00\x0e\x00UI", b"IL"))
    assert not any(receiver.spool.root.rglob("*.dcm"))


def test_toml_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_bytes(b'[dicom]\nae_title = "\xc1\xdf"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_settings(path, environ={})


def test_ack_for_a_message_with_a_malformed_msh9_is_built(tmp_path: Path) -> None:
    from appliance.prefetch.acks import build_ack
    from appliance.prefetch.messages import parse_message

    text = ("MSH|^~\\&|RIS|HOSP|PAS|HOPS|202MSH|^~\\&|RIS|60101120000||ORM^O01|MSHOSP|PAS|HOSP|"
            "20260101120000||SIU^S12|MSG0002|P|2.5\rSCH|APPT1\rPID|1||PAT002^^^HOSP||ROE^")
    ack = build_ack(parse_message(text))
    assert ack.startswith("MSH|") and "\rMSA|AA|" in ack
