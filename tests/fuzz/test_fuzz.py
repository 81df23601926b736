"""Each fuzz target runs for a bounded time under libFuzzer (atheris): no crash, no hang
(per-input timeout), bounded memory (RSS limit). Seeds are real inputs: pydicom's test files
and the shared CT set (receive), real packed and sealed buckets (bucket), real ORM/SIU/ADT
messages (hl7), the shipped example configuration (config).

Executions per second are printed (``-s`` shows them) for docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.support.peers import CT_DIR, ROOT

# Seconds under libFuzzer per target in `make test`; PAS_FUZZ_SECONDS gives every target that
# many. The C-STORE dataset path is the slowest (52-352 exec/s, docs/reliability.md) and found
# the most: it keeps 10 s. The bucket decoder (400-30,000 exec/s), the HL7 parser
# (1,100-3,200) and the configuration loader (435-3,300) get 5 s: still thousands of inputs
# each on a loaded machine, and 15 s less of the suite (the instrumented start-up, ~3 s a
# target, is paid whatever the seconds).
TARGET_SECONDS = {"receive": 10, "bucket": 5, "hl7": 5, "config": 5}
RSS_LIMIT_MB = 1024

# libFuzzer's -rss_limit_mb reads getrusage()'s ru_maxrss, and Linux carries that peak across
# fork and execve: a fuzzer started straight from a pytest worker that once held 1.5 GB (a
# big-study test earlier in the same worker) reports 1.5 GB from its first input and stops
# with "out-of-memory". A shell in between (not exec'ing its command, hence the "; exit")
# gives the fuzzer the small shell's peak instead of the worker's.
FRESH_PEAK = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]


def _dataset_part(content: bytes) -> bytes:
    group_length = int.from_bytes(content[140:144], "little")
    return content[144 + group_length:]


def _seeds_receive(corpus: Path) -> None:
    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "MR_small_RLE.dcm",
             "JPEG2000.dcm", "MR_truncated.dcm"]
    sources = [Path(get_testdata_file(n)) for n in names]  # type: ignore[arg-type]
    sources.append(sorted(CT_DIR.glob("*.dcm"))[0])
    for n, source in enumerate(sources):
        content = source.read_bytes()
        body = _dataset_part(content) if content[128:132] == b"DICM" else content
        # byte 0 picks the transfer syntax, byte 1 the path (dataset / whole file)
        (corpus / f"seed{n}").write_bytes(bytes([0, n % 4]) + body[:200_000])


def _seeds_bucket(corpus: Path, tmp: Path) -> None:
    from appliance.transfer.pack import PackItem, pack_bucket, plan_buckets
    from appliance.transfer.seal import seal_bucket

    items = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]
        path = tmp / name
        path.write_bytes(data)
        import hashlib

        items.append(PackItem(name, path, len(data), hashlib.sha256(data).hexdigest()))
    for plan in plan_buckets(items, target_bytes=16 * 1024):
        payload, _stats = pack_bucket(plan)
        (corpus / f"bucket{plan.index}").write_bytes(payload)
        sealed = seal_bucket(bytes(range(32)), "transfer-1", 0, payload)
        (corpus / f"sealed{plan.index}").write_bytes(sealed)


HL7_SEEDS = [
    "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20260101120000||ORM^O01|MSG0001|P|2.5\r"
    "PID|1||PAT001^^^HOSP||DOE^JOHN||19600101|M\r"
    "ORC|NW|ORD1\rOBR|1|ORD1||CT^CT CHEST|||20260102090000\r",
    "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20260101120000||SIU^S12|MSG0002|P|2.5\r"
    "SCH|APPT1\rPID|1||PAT002^^^HOSP||ROE^JANE\rAIS|1||MR^MR BRAIN|20260103100000\r",
    "MSH|^~\\&|ADT|HOSP|PAS|HOSP|20260101120000||ADT^A01|MSG0003|P|2.5\r"
    "PID|1||PAT003^^^HOSP||POE^ED\rPV1|1|I\r",
    "MSH|^~\\&|ADT|HOSP|PAS|HOSP|20260101120000||ADT^A40^ADT_A39|MSG0004|P|2.5\r"
    "EVN|A40\rPID|1||PAT004^^^HOSP||ROE^JO\rMRG|TMP004^^^HOSP\r"
    "PID|2||PAT005^^^HOSP\rMRG|TMP005~X^^^OTHER\r",
]


def _seeds(target: str, corpus: Path, tmp: Path) -> None:
    if target == "receive":
        _seeds_receive(corpus)
    elif target == "bucket":
        _seeds_bucket(corpus, tmp)
    elif target == "hl7":
        for n, text in enumerate(HL7_SEEDS):
            (corpus / f"hl7_{n}").write_text(text)
    elif target == "config":
        for n, path in enumerate(sorted((ROOT / "config").glob("*.toml"))):
            (corpus / f"config{n}").write_bytes(path.read_bytes())
        (corpus / "minimal").write_text('[dicom]\nae_title = "PAS"\nport = 11112\n')


@pytest.mark.parametrize("target", ["receive", "bucket", "hl7", "config"])
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    seconds = int(os.environ.get("PAS_FUZZ_SECONDS", TARGET_SECONDS[target]))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _seeds(target, corpus, tmp_path)
    assert any(corpus.iterdir()), "no seed: the fuzzer would start blind"
    result = subprocess.run(
        [*FRESH_PEAK, sys.executable, "-m", "tests.fuzz.harnesses", target,
         f"-max_total_time={seconds}", f"-rss_limit_mb={RSS_LIMIT_MB}",
         f"-malloc_limit_mb={RSS_LIMIT_MB}", "-timeout=10", "-print_final_stats=1",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120,
        # The harness's home (tempfile.mkdtemp) under this test's folder: it ends with
        # os._exit, and its folders were left in /tmp by every run.
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    output = result.stdout + result.stderr
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    speed = re.search(r"stat::average_exec_per_sec:\s*(\d+)", output)
    peak = re.search(r"stat::peak_rss_mb:\s*(\d+)", output)
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-",
                                                                        "oom-", "leak-"))]
    assert result.returncode == 0 and not crashes, f"{target}: {crashes}\n{output[-4000:]}"
    assert runs and int(runs.group(1)) > 0, output[-2000:]
    print(f"\nfuzz {target}: {runs.group(1)} executions in {seconds} s, "
          f"{speed.group(1) if speed else '?'} exec/s, peak RSS {peak.group(1) if peak else '?'}"
          f" MB")


def test_fuzzer_starts_with_its_own_memory_peak() -> None:
    """A worker that once held a big study must not hand its peak to the fuzzer's RSS limit."""
    ballast = bytearray(1200 * 1024 * 1024)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page
    del ballast
    probe = [sys.executable, "-c",
             "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"]
    inherited = int(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    fresh = int(subprocess.run([*FRESH_PEAK, *probe], capture_output=True, text=True,
                               check=True).stdout)
    assert inherited >= 1100, f"the probe should see the worker's peak, saw {inherited} MB"
    assert fresh < 200, f"the fuzzer would start at {fresh} MB"
