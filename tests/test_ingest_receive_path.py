"""The quick header read (appliance/ingest/header.py + attributes.record_from_raw) against
pydicom's full parse: on every real file we have, the same record or the same refusal."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.uid import UID

from appliance.ingest import receive
from appliance.ingest.attributes import InvalidInstance
from appliance.ingest.header import read_header
from tests.support.peers import CT_DIR, MR_DIR
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
    quick = outcome(lambda: receive._read_dataset_record(header, dataset, str(syntax)))
    full = outcome(lambda: receive._read_record(header + dataset))
    walked = syntax.is_transfer_syntax and read_header(
        dataset, syntax.is_implicit_VR, syntax.is_little_endian) is not None
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
        quick = outcome(lambda: receive._read_dataset_record(header, bad, syntax))  # noqa: B023
        assert quick == outcome(lambda: receive._read_record(header + bad))  # noqa: B023
        assert quick[0] == "refused", quick
