"""Coverage-guided fuzz targets (atheris / libFuzzer) for PAS's untrusted-input parsers.

Run one: ``python -m tests.fuzz.harnesses TARGET [libFuzzer flags] CORPUS_DIR``. Each target
accepts only the documented refusal (the exception that becomes a clear error for the
sender); anything else escaping is a crash libFuzzer reports and saves. ``tests/fuzz/
test_fuzz.py`` runs each for a bounded time with an RSS limit and a per-input timeout.

Targets:
- ``receive``: the C-STORE dataset path, :meth:`Receiver.receive_dataset` (and the whole
  ``receive_file`` path down to the spool and the index). Refusal: ``InvalidInstance``.
  Also checked: no temp file left behind, no file written for a refused object.
- ``bucket``: the hub's decoder, ``pack.unpack_bucket`` and ``seal.open_bucket``.
  Refusals: ``BucketFormatError``, ``BucketRejected``.
- ``hl7``: the prefetch parser, ``messages.parse_message`` + ``interpret`` + ``build_ack``.
  Refusal: ``Refusal``.
- ``config``: ``config.load_settings`` on arbitrary TOML. Refusal: ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

EXPLICIT_LE = "1.2.840.10008.1.2.1"
SYNTAXES = [EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.80"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _modules_in(package: str, *folders: str) -> list[str]:
    """The names of the modules in ``folders`` of ``package`` (installed), read from its
    files: nothing is imported (a module imported here would be imported uninstrumented)."""
    spec = importlib.util.find_spec(package)  # a top-level package: found, not imported
    assert spec is not None and spec.origin is not None, package
    top = Path(spec.origin).parent
    names = []
    for folder in folders:
        for path in sorted(top.joinpath(*folder.split(".")).rglob("*.py")):
            parts = path.relative_to(top.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


# What the receive target does not instrument of pydicom: code it never runs for an input,
# whose instrumentation was half of the target's start-up (7 s of 14 on a loaded machine,
# before the first input). Its data dictionaries (module-level literals of thousands of
# entries, no function: _private_dict alone took 1.8 s), the test files' download, and the
# codecs: the C-STORE path reads the pixel data's length (pydicom.pixels.utils, instrumented)
# but never decodes nor encodes it (appliance/store/transcode.py does, on a retrieve).
RECEIVE_NOT_INSTRUMENTED = (
    "pydicom._dicom_dict", "pydicom._private_dict", "pydicom._uid_dict",
    "pydicom.pixels.processing",
)
RECEIVE_FOLDERS_NOT_INSTRUMENTED = (
    "data", "pixels.decoders", "pixels.encoders", "pixel_data_handlers", "waveforms",
)


def receive_target() -> Callable[[bytes], None]:
    exclude = [*RECEIVE_NOT_INSTRUMENTED,
               *_modules_in("pydicom", *RECEIVE_FOLDERS_NOT_INSTRUMENTED)]
    with atheris.instrument_imports(include=["appliance", "pydicom"], exclude=exclude):
        from appliance.ingest.attributes import InvalidInstance
        from appliance.ingest.receive import Receiver, StorageFailure, part10_header
        from appliance.store.db import Database
        from appliance.store.spool import Spool, SpoolFull
    home = Path(tempfile.mkdtemp(prefix="pas-fuzz-receive-"))
    db = Database(home / "pas.sqlite")
    db.connection().execute("PRAGMA synchronous=OFF")  # speed: durability is not under test
    spool = Spool(home / "spool", fsync=False)
    receiver = Receiver(db, spool)

    def files_now() -> int:  # outside tmp/ (where empty temp files are created ahead)
        return sum(len(files) for root, _dirs, files in os.walk(spool.root)
                   if Path(root) != spool.tmp)

    def target(data: bytes) -> None:
        if len(data) < 2:
            return
        syntax = SYNTAXES[data[0] % len(SYNTAXES)]
        body = data[2:]
        before = files_now() if data[1] & 1 else None
        try:
            if data[1] & 2:
                header = part10_header(CT_IMAGE, "1.2.3.4", syntax, "FUZZ")
                receiver.receive_file(header + body, calling_ae="FUZZ")
            else:
                receiver.receive_dataset(body, transfer_syntax_uid=syntax,
                                         sop_class_uid=CT_IMAGE, sop_instance_uid="1.2.3.4",
                                         calling_ae="FUZZ")
        except InvalidInstance:
            if before is not None and files_now() != before:
                raise AssertionError("a refused object left a file in the spool") from None
        except (SpoolFull, StorageFailure):
            pass
        if any(p.stat().st_size for p in spool.tmp.iterdir()):
            raise AssertionError("a temp file with bytes was left in spool/tmp")

    return target


def bucket_target() -> Callable[[bytes], None]:
    with atheris.instrument_imports(include=["appliance"]):
        from appliance.transfer.pack import BucketFormatError, unpack_bucket
        from appliance.transfer.seal import BucketRejected, open_bucket
    key = bytes(range(32))

    def target(data: bytes) -> None:
        payloads = [data]
        # Only a seed sealed with this key, transfer and index opens; its plaintext then
        # goes through the decoder too.
        with contextlib.suppress(BucketRejected):
            payloads.append(open_bucket(key, "transfer-1", 0, data))
        for payload in payloads:
            try:
                for piece in unpack_bucket(payload):
                    if piece.offset + len(piece.data) > piece.total_size:
                        raise AssertionError("a piece runs past its file's declared size")
            except BucketFormatError:
                pass

    return target


def hl7_target() -> Callable[[bytes], None]:
    with atheris.instrument_imports(include=["appliance", "hl7"]):
        from appliance.prefetch.acks import build_ack
        from appliance.prefetch.charsets import message_encoding
        from appliance.prefetch.merges import interpret_merges, is_merge
        from appliance.prefetch.messages import NotUsed, Refusal, interpret, parse_message

    def target(data: bytes) -> None:
        text = data.decode(message_encoding(data, "utf-8")[0], errors="replace")  # as served
        message = None
        try:
            message = parse_message(text)
            if is_merge(message):  # as orders.handle reads it
                interpret_merges(message)
            else:
                interpret(message)
        except Refusal as refusal:
            build_ack(message, refusal.ack_code, str(refusal))
            return
        except NotUsed as unused:  # an ADT event not read: ACKed AA, as orders.handle does
            build_ack(message, "AA", str(unused))
            return
        build_ack(message)

    return target


def config_target() -> Callable[[bytes], None]:
    # pydantic not instrumented: its validation runs in pydantic-core (compiled, never
    # instrumented), and of its Python only 14 small functions run for an input (defaults,
    # deep copies). Instrumented, its schema generation (run as appliance.config's models
    # are built) took 5-12 s of the target's start, before the first input.
    with atheris.instrument_imports(include=["appliance"]):
        from appliance.config import ConfigError, load_settings
    folder = Path(tempfile.mkdtemp(prefix="pas-fuzz-config-"))
    path = folder / "appliance.toml"

    def target(data: bytes) -> None:
        path.write_bytes(data)
        try:
            load_settings(path, environ={})
        except ConfigError as exc:
            if not exc.problems or not all(isinstance(p, str) and p for p in exc.problems):
                raise AssertionError("a ConfigError must name each problem") from None

    return target


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "receive": receive_target, "bucket": bucket_target, "hl7": hl7_target,
    "config": config_target,
}


def main() -> None:
    name = sys.argv.pop(1)
    target = TARGETS[name]()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
