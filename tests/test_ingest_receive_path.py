"""The receive path's shortcuts, each against what it replaces: the quick header read
(appliance/ingest/header.py + attributes.record_from_raw) against pydicom's full parse (on
every real file we have, the same record or the same refusal), and the group commit of
index rows against one transaction per instance (every row, each all or nothing)."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.ingest import reading, receive
from appliance.ingest.attributes import InvalidInstance, pixel_geometry, record_from_raw
from appliance.ingest.header import Truncated, read_header
from tests.support.objects import tiny_ct
from tests.support.peers import CT_DIR, MR_DIR, PasProcess, read_rows, storescu, wait_for
from tests.test_ingest import dataset_part


def outcome(call: object) -> object:
    try:
        return dataclasses.asdict(call())  # type: ignore[operator]
    except InvalidInstance as exc:
        return ("refused", str(exc).split(":")[0])


def both_paths(path: Path) -> tuple[object, object, bool]:
    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    syntax = UID(str(meta.TransferSyntaxUID))
    header = receive.part10_header(str(meta.MediaStorageSOPClassUID),
                                   str(meta.MediaStorageSOPInstanceUID), str(syntax))
    dataset = dataset_part(path)
    quick = outcome(lambda: reading.read_dataset_record(header, dataset, str(syntax)))
    full = outcome(lambda: reading.read_record(header + dataset))
    try:
        walked = syntax.is_transfer_syntax and read_header(
            dataset, syntax.is_implicit_VR, syntax.is_little_endian) is not None
    except Truncated:  # refused by both paths (compared by the caller)
        walked = True
    return quick, full, walked


def test_real_sets_take_the_quick_path_with_the_same_records() -> None:
    files = sorted(CT_DIR.glob("*.dcm")) + sorted(MR_DIR.glob("*.dcm"))
    assert len(files) == 582
    for path in files:
        quick, full, walked = both_paths(path)
        assert walked, path.name
        assert quick == full, path.name


def test_every_pydicom_data_file_gives_the_same_record_or_refusal() -> None:
    walked_count = compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files():
            path = Path(name)
            try:
                meta = dcmread(path, stop_before_pixels=True).file_meta
                if "MediaStorageSOPInstanceUID" not in meta or "TransferSyntaxUID" not in meta:
                    continue
                dataset_part(path)
            except Exception:
                continue
            quick, full, walked = both_paths(path)
            assert quick == full, path.name
            compared += 1
            walked_count += walked
    assert compared > 150 and walked_count > 100, (compared, walked_count)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_or_garbage_datasets_are_refused_as_before(cut: float) -> None:
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    meta = dcmread(source, stop_before_pixels=True).file_meta
    syntax = str(meta.TransferSyntaxUID)
    header = receive.part10_header(str(meta.MediaStorageSOPClassUID),
                                   str(meta.MediaStorageSOPInstanceUID), syntax)
    dataset = dataset_part(source)
    for bad in (dataset[:int(len(dataset) * cut)], os.urandom(4096)):
        quick = outcome(lambda: reading.read_dataset_record(header, bad, syntax))  # noqa: B023
        assert quick == outcome(lambda: reading.read_record(header + bad))  # noqa: B023
        assert quick[0] == "refused", quick


def test_group_commit_indexes_concurrent_instances_each_all_or_nothing(tmp_path: Path) -> None:
    """Eight threads filing at once (as eight modalities would): every row committed once,
    duplicates recognised inside a shared transaction, and one row the schema refuses fails
    alone without taking the others of its transaction down."""
    import threading

    from appliance.store import index
    from appliance.store.db import Database

    db = Database(tmp_path / "pas.sqlite")
    commits = receive.GroupCommit(db)
    results: dict[str, object] = {}

    def record(name: str, study: str | None) -> index.InstanceRecord:
        return index.InstanceRecord(sop_instance_uid=f"1.2.3.{name}", sop_class_uid="1.2",
                                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                                    study_uid=study, series_uid=f"1.2.3.9.{study}",  # type: ignore[arg-type]
                                    patient_id="P1")

    def work(thread: int) -> None:
        for n in range(40):
            name = f"{thread}.{n}"
            study = None if (thread, n) == (3, 17) else f"1.2.3.{thread % 2}"
            stored = index.StoredFile(f"ab/{name}.dcm", 10, f"sha-{name}")
            try:
                results[name] = commits.record(record(name, study), stored)
                if n % 10 == 0:  # the same bytes again: a duplicate, nothing new
                    again = commits.record(record(name, study), stored)
                    assert again.duplicate and again.instance_id == results[name].instance_id
            except Exception as exc:  # noqa: BLE001
                results[name] = exc

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = {name for name, result in results.items() if isinstance(result, Exception)}
    assert failed == {"3.17"}, failed
    assert "NOT NULL" in str(results["3.17"])
    rows = db.query("SELECT sop_instance_uid FROM instances")
    assert sorted(r[0] for r in rows) == sorted(f"1.2.3.{n}" for n in results if n != "3.17")
    assert db.query_one("SELECT count(*) AS n FROM studies")["n"] == 2


def test_one_instance_failing_outside_sqlite_does_not_fail_its_group(tmp_path: Path) -> None:
    """A value SQLite cannot bind raises OverflowError, not sqlite3.Error: in a group commit
    it failed every C-STORE sharing the transaction (the savepoint's catch took only SQLite's
    errors). Three instances committed together, the middle one unbindable: it alone fails."""
    from appliance.store import index
    from appliance.store.db import Database

    db = Database(tmp_path / "pas.sqlite")
    commits = receive.GroupCommit(db)

    def pending(n: int, instance_number: int) -> receive._Pending:
        record = index.InstanceRecord(
            sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", study_uid="1.2.3", series_uid="1.2.3.9",
            patient_id="P1", instance_number=instance_number)
        return receive._Pending(record, index.StoredFile(f"ab/{n}.dcm", 10, f"sha-{n}"), {})

    batch = [pending(1, 1), pending(2, 2**70), pending(3, 3)]
    commits._commit(batch)
    assert [type(item.error).__name__ if item.error else "ok" for item in batch] == [
        "ok", "OverflowError", "ok"]
    rows = db.query("SELECT sop_instance_uid FROM instances ORDER BY sop_instance_uid")
    assert [r[0] for r in rows] == ["1.2.3.1", "1.2.3.3"]


def test_a_transaction_sqlite_rolled_back_whole_fails_every_instance_of_its_group(
        tmp_path: Path) -> None:
    """SQLITE_FULL (here the index at its max_page_count) rolls the whole transaction back,
    the instances before the failing one included. The batch must end there: every C-STORE
    of it fails (0xA700), and nothing after the failing one is committed on its own (each
    SAVEPOINT outside a transaction is one, and its RELEASE commits it: before c0e1ddc the
    third row was committed for a C-STORE answered "failed", whose file the receive path
    then removed)."""
    from appliance.store import index
    from appliance.store.db import Database

    db = Database(tmp_path / "pas.sqlite")
    commits = receive.GroupCommit(db)

    def pending(n: int, description: str | None = None) -> receive._Pending:
        record = index.InstanceRecord(
            sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", study_uid="1.2.3", series_uid="1.2.3.9",
            patient_id="P1", series_description=description)
        return receive._Pending(record, index.StoredFile(f"ab/{n}.dcm", 10, f"sha-{n}"), {})

    commits._commit([pending(0)])  # the tables' first pages
    pages = db.query_one("PRAGMA page_count")[0]
    db.connection().execute(f"PRAGMA max_page_count = {pages + 4}")
    batch = [pending(1), pending(2, "x" * 200_000), pending(3)]
    commits._commit(batch)
    rows = db.query("SELECT sop_instance_uid FROM instances ORDER BY sop_instance_uid")
    assert [r[0] for r in rows] == ["1.2.3.0"]
    # Each the disk-full error itself, which the receive path answers 0xA700 (out of
    # resources, try again), not "SQLite rolled the transaction back" (0xC000-class).
    assert [getattr(item.error, "sqlite_errorcode", None) for item in batch] == [
        sqlite3.SQLITE_FULL] * 3


def test_temp_files_of_a_live_writer_survive_recovery_run_by_another_process(
        tmp_path: Path) -> None:
    """Spool writes take temp files created ahead (spool.py's _TempFiles). Recovery run by
    another process (``pas verify --repair`` beside the daemon) must leave those of a live
    writer alone, and still remove a dead one's and an interrupted write."""
    import subprocess
    import sys

    from appliance.store.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.write([b"first"])
    wait_for(lambda: len(list(spool.tmp.glob("*.part"))) >= 4, 10, what="temp files ahead")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (spool.tmp / f"{dead}-0000.part").write_bytes(b"")
    (spool.tmp / "interrupted.part").write_bytes(b"half a write")
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from appliance.store.spool import Spool; "
         "print(Spool(Path(sys.argv[1])).remove_temp_files())", str(spool.root)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert other.stdout.strip() == "1"  # the interrupted write; empty ones are not counted
    left = {p.name for p in spool.tmp.glob("*.part")}
    assert f"{dead}-0000.part" not in left and "interrupted.part" not in left
    assert all(name.startswith(f"{os.getpid()}-") for name in left) and len(left) >= 4
    for n in range(8):  # the writer's own temp files are all still usable
        stored, created = spool.write([f"instance {n}".encode()])
        assert created and (spool.root / stored.path).read_bytes() == f"instance {n}".encode()


def test_a_spool_write_makes_a_vanished_fan_out_directory_again(tmp_path: Path) -> None:
    """The 256 fan-out directories are made at start, so a write no longer checks for them;
    one removed under a running daemon (a careless clean-up) is made again by the write that
    needs it, and the same bytes written again are recognised as held."""
    import hashlib
    import shutil

    from appliance.store.spool import Spool

    spool = Spool(tmp_path / "spool")
    content = b"an instance whose fan-out directory is gone"
    fan_out = spool.root / hashlib.sha256(content).hexdigest()[:2]
    shutil.rmtree(fan_out)
    stored, created = spool.write([content, b""])
    assert created and (spool.root / stored.path).read_bytes() == content
    assert stored.sha256 == hashlib.sha256(content).hexdigest() and stored.size == len(content)
    again, created_again = spool.write([content])
    assert again == stored and not created_again
    assert not [p for p in spool.tmp.glob("*.part") if p.stat().st_size]  # no temp left


def test_the_sequence_tags_remembered_stay_bounded_whatever_the_senders_tags() -> None:
    """Implicit VR: whether a tag is a sequence is looked up once per tag and remembered; a
    sender inventing tags (20,000 distinct private ones here) cannot grow that memory past its
    bound, and the walk still reads the dataset."""
    import struct

    from appliance.ingest import header

    elements = [struct.pack("<HHI", 0x0009, element, 2) + b"AB"
                for element in range(0x1000, 0x1000 + 20_000)]
    uid = b"1.2.3.4\x00"
    dataset = (struct.pack("<HHI", 0x0008, 0x0018, len(uid)) + uid + b"".join(elements))
    walked = header.read_header(dataset, implicit_vr=True, little_endian=True)
    assert walked is not None and walked.dataset.SOPInstanceUID == "1.2.3.4"
    assert 0 < len(header._implicit_sq) <= header.IMPLICIT_SQ_REMEMBERED


@pytest.mark.parametrize("quota_bytes", [0, 10**12])
def test_no_cstore_sums_the_instances_and_only_a_quota_reads_the_size(
        tmp_path: Path, quota_bytes: int) -> None:
    """The quota check needs the spool's size: the row the index's triggers keep, read for
    each C-STORE when a quota is set, never otherwise; no C-STORE sums the instances (once a
    sum over every row every 2 s: ~0.25 s at two million)."""
    from appliance.store.db import Database
    from appliance.store.spool import Spool

    db = Database(tmp_path / "pas.sqlite")
    receiver = receive.Receiver(db, Spool(tmp_path / "spool", fsync=False,
                                          quota_bytes=quota_bytes))
    statements: list[str] = []
    db.connection().set_trace_callback(statements.append)
    for path in sorted(CT_DIR.glob("*.dcm"))[:3]:
        receiver.receive_file(path.read_bytes())
    assert not [s for s in statements if "sum(" in s]
    reads = [s for s in statements if "FROM instance_totals" in s]
    assert len(reads) == (3 if quota_bytes else 0), reads


def test_an_integer_past_the_range_of_an_is_is_no_value_for_the_index(pas: PasProcess,
                                                                      tmp_path: Path) -> None:
    """An InstanceNumber, SeriesNumber or NumberOfFrames of 20 digits (an IS holds a 32-bit
    signed integer in 12 characters): the index took it whole, SQLite refused to bind it
    (OverflowError) and the C-STORE failed ("unexpected error"), with it any instance
    sharing its group commit (and the two paths disagreed on it: 99999999999999999999 read
    raw, 100000000000000000000 through pydicom's float). Now it is no value for the index,
    as an unreadable one is, the same by both paths, and the instance is stored as sent."""
    sent = tmp_path / "sent"
    sent.mkdir()
    too_long = b"99999999999999999999"
    for n, tag in enumerate((0x00200013, 0x00200011, 0x00280008)):
        ds = tiny_ct()
        ds[tag] = RawDataElement(Tag(tag), "IS", len(too_long), too_long, 0, False, True)
        ds.save_as(sent / f"{n}.dcm", enforce_file_format=True)
        quick, full, walked = both_paths(sent / f"{n}.dcm")
        assert quick == full and walked
        assert isinstance(quick, dict)
        assert None in (quick["instance_number"], quick["series_number"],
                        quick["number_of_frames"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storescu(sent, pas.port)  # raises on a failure status
    rows = read_rows(pas.home / "pas.sqlite", "SELECT i.instance_number, i.number_of_frames, "
                     "se.series_number FROM instances i JOIN series se ON se.id = i.series_fk")
    assert sorted((r["instance_number"] or 0, r["series_number"] or 0) for r in rows) == [
        (0, 1), (1, 0), (1, 1)]
    assert [r["number_of_frames"] for r in rows] == [None] * 3


def _geometry_and_expected(path: Path) -> tuple[object, object]:
    """(pixel_geometry's expected length or None when it leaves it to pydicom, pydicom's
    expected length from its full parse or the exception type it raises)."""
    full = dcmread(path, force=True)
    try:
        expected: object = get_expected_length(full, unit="bytes")
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        expected = type(exc)
    syntax = UID(str(full.file_meta.TransferSyntaxUID))
    try:
        quick = read_header(dataset_part(path), syntax.is_implicit_VR,
                            syntax.is_little_endian)
    except Truncated:  # refused before any pixel check
        return None, expected
    if quick is None:
        return None, expected
    try:
        record = record_from_raw(quick.dataset, str(syntax))
    except InvalidInstance:
        return None, expected
    geometry = pixel_geometry(quick.dataset, record)
    return (None if geometry is None else get_expected_length(geometry)), expected


def test_the_pixel_check_reads_the_records_geometry_as_pydicom_would() -> None:
    """The pixel-length check takes its geometry from the values the record already decoded
    (attributes.pixel_geometry), not from pydicom's conversion of each raw element (60-70 us
    per image): the expected length must be pydicom's on every file we have where the
    shortcut is taken, and it must be taken on the real sets."""
    taken = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = sorted(CT_DIR.glob("*.dcm")) + sorted(MR_DIR.glob("*.dcm"))
        for name in [*files, *get_testdata_files()]:
            path = Path(name)
            try:
                meta = dcmread(path, stop_before_pixels=True).file_meta
                if "TransferSyntaxUID" not in meta or not UID(
                        str(meta.TransferSyntaxUID)).is_transfer_syntax:
                    continue
                dataset_part(path)
            except Exception:  # noqa: BLE001 - not a Part 10 file we can split
                continue
            shortcut, expected = _geometry_and_expected(path)
            if shortcut is not None:
                assert shortcut == expected, path.name
                taken += 1
    assert taken > 582 + 50, taken


@pytest.mark.parametrize(("attributes", "pixel_bytes", "refused"), [
    ({}, 126, True),                                        # a pixel short of 8x8x2
    ({}, 128, False),
    ({"NumberOfFrames": 3}, 128 * 3 - 2, True),
    ({"NumberOfFrames": 3}, 128 * 3, False),
    ({"NumberOfFrames": 0}, 128, False),                    # pydicom reads 0 as 1 frame
    ({"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0, "Rows": 16, "Columns": 16}, 32,
     False),                                                # 256 bits
    ({"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0, "Rows": 16, "Columns": 16}, 30,
     True),
    ({"SamplesPerPixel": 3, "PhotometricInterpretation": "YBR_FULL_422",
      "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PlanarConfiguration": 0}, 128,
     False),                                                # 8x8x3 // 3 * 2
    ({"SamplesPerPixel": 3, "PhotometricInterpretation": "YBR_FULL_422",
      "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PlanarConfiguration": 0}, 126,
     True),
    ({"PhotometricInterpretation": "MONOCHROME2\\MONOCHROME1"}, 126, True),  # pydicom's way
])
def test_short_pixel_data_is_refused_by_both_paths_alike(
        tmp_path: Path, attributes: dict[str, object], pixel_bytes: int, refused: bool) -> None:
    ds = tiny_ct(**attributes)
    ds.PixelData = bytes(pixel_bytes)
    _assert_pixel_check_alike(tmp_path, ds, refused)


def _assert_pixel_check_alike(tmp_path: Path, ds: Dataset, refused: bool) -> None:
    """Both paths read ``ds`` (the quick walk did) to the same outcome: refused for short
    pixel data exactly when ``refused``."""
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    quick, full, walked = both_paths(path)
    assert walked
    assert quick == full
    assert (quick == ("refused", "PixelData is truncated")) is refused, quick


YBR_422 = {"SamplesPerPixel": 3, "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7,
           "PlanarConfiguration": 0}


@pytest.mark.parametrize(("tag", "vr", "value", "attributes", "pixel_bytes", "refused"), [
    # pydicom trims a CS value's trailing spaces and NULs only: " YBR_FULL_422" is not
    # YBR_FULL_422 to it, 8x8x3 bytes are expected (the quick path took 2/3 of that).
    (0x00280004, "CS", b" YBR_FULL_422 ", YBR_422, 128, True),
    (0x00280004, "CS", b"YBR_FULL_422\t ", YBR_422, 128, True),
    (0x00280004, "CS", b"YBR_FULL_422\x00\x00", YBR_422, 128, False),
    # NumberOfFrames 50 as US: "2\x00" is no text "2" (the quick path expected 2 frames).
    (0x00280008, "US", (50).to_bytes(2, "little"), {}, 128 * 2, True),
    (0x00280008, "US", (50).to_bytes(2, "little"), {}, 128 * 50, False),
    # A DS Rows: pydicom's float makes no int of the expected length and skips the check
    # (the quick path used the record's int 8 and refused).
    (0x00280010, "DS", b"8 ", {}, 126, False),
    (0x00280008, "DS", b"2 ", {}, 128 * 2 - 2, False),
    (0x00280008, "IS", b"2.5 ", {}, 128 * 2 - 2, False),   # pydicom's ISfloat 2.5
])
def test_odd_geometry_values_give_pydicoms_pixel_check_on_both_paths(
        tmp_path: Path, tag: int, vr: str, value: bytes, attributes: dict[str, object],
        pixel_bytes: int, refused: bool) -> None:
    ds = tiny_ct(**attributes)
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    ds.PixelData = bytes(pixel_bytes)
    _assert_pixel_check_alike(tmp_path, ds, refused)


def test_an_instance_number_written_as_us_is_its_number_on_both_paths(tmp_path: Path) -> None:
    """InstanceNumber 50 and SeriesNumber 49 as US: the quick path read the bytes "2\\x00"
    and "1\\x00" as text and indexed 2 and 1."""
    ds = tiny_ct()
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "US", 2, b"2\x00", 0, False, True)
    ds[0x00200011] = RawDataElement(Tag(0x00200011), "US", 2, b"1\x00", 0, False, True)
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    quick, full, walked = both_paths(path)
    assert walked
    assert quick == full
    assert isinstance(quick, dict)
    assert (quick["instance_number"], quick["series_number"]) == (50, 49)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_dataset_cut_inside_a_short_top_level_value_is_refused_naming_it(
        tmp_path: Path, syntax: str) -> None:
    """The walk reads most elements (short values, no sequence) on a path of its own; a
    dataset that ends inside one of their values is refused naming the element and the
    bytes missing, as one that ends inside a long value is, and pydicom's full parse
    refuses it too."""
    ds = tiny_ct(PatientName="Doe^Jane^Middle")
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = receive.part10_header(ds.SOPClassUID, ds.SOPInstanceUID, syntax)
    dataset = dataset_part(path)
    if syntax == ExplicitVRLittleEndian:
        name_at = dataset.index(b"\x10\x00\x10\x00PN")  # (0010,0010) PatientName
        length = int.from_bytes(dataset[name_at + 6:name_at + 8], "little")
    else:
        name_at = dataset.index(b"\x10\x00\x10\x00")
        length = int.from_bytes(dataset[name_at + 4:name_at + 8], "little")
    assert length == 16
    cut = dataset[:name_at + 8 + 2]
    with pytest.raises(InvalidInstance, match=(
            rf"dataset truncated: element \(0010,0010\) declares {length} bytes, 2 remain")):
        reading.read_dataset_record(header, cut, syntax)
    assert outcome(lambda: reading.read_record(header + cut))[0] == "refused"
