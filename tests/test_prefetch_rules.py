"""Prefetch decisions without I/O: rules, WAN windows, HL7 times and fields, multipart parsing,
and the store's idempotence (one SQLite file in a temporary directory)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from appliance.config import ConfigError, PrefetchRule, PrefetchWindow, load_settings
from appliance.prefetch.messages import (
    NotUsed,
    Refusal,
    interpret,
    parse_hl7_time,
    parse_message,
)
from appliance.prefetch.rules import (
    Candidate,
    candidate_from_qido,
    choose_priors,
    in_window,
    next_window_start,
    rule_for,
)
from appliance.store import prefetch as store
from appliance.store.db import Database
from appliance.transfer.region import RegionError, multipart_parts

TODAY = dt.date(2026, 11, 23)


def cand(uid: str, date: str, modalities: str = "CT", accession: str = "",
         parts: str = "") -> Candidate:
    return Candidate(uid, date, accession, frozenset(modalities.split(",")), 10,
                     frozenset(p for p in parts.split(",") if p))


CANDIDATES = [
    cand("1", "20261120", "CT", "ACC-NOW", "CHEST"),
    cand("2", "20250101", "CT", "A2", "CHEST"),
    cand("3", "20240101", "MR", "A3", "HEAD"),
    cand("4", "20100101", "CT,SR", "A4", "ABDOMEN"),
    cand("5", "20230601", "CT", "A5", "CHEST"),
]


def test_newest_first_at_most_n_never_the_current_accession() -> None:
    rule = PrefetchRule(name="r", priors=2)
    chosen = choose_priors(rule, CANDIDATES, modality="CT", body_part=None,
                           accession="ACC-NOW", today=TODAY)
    assert [c.study_uid for c in chosen] == ["2", "3"]


def test_current_study_uid_is_excluded_for_arrivals() -> None:
    rule = PrefetchRule(name="r", priors=1)
    chosen = choose_priors(rule, CANDIDATES, modality="CT", body_part=None, accession=None,
                           current_study_uid="1", today=TODAY)
    assert [c.study_uid for c in chosen] == ["2"]


def test_same_modality_and_max_age() -> None:
    rule = PrefetchRule(name="r", priors=10, same="modality", max_age_days=5 * 365)
    chosen = choose_priors(rule, CANDIDATES, modality="ct", body_part=None, accession="ACC-NOW",
                           today=TODAY)
    assert [c.study_uid for c in chosen] == ["2", "5"]  # 3 is MR, 4 is 16 years old


def test_same_body_part() -> None:
    rule = PrefetchRule(name="r", priors=10, same="body_part")
    chosen = choose_priors(rule, CANDIDATES, modality="CT", body_part="chest", accession=None,
                           today=TODAY)
    assert [c.study_uid for c in chosen] == ["1", "2", "5"]


def test_rule_for_the_ordered_modality() -> None:
    rules = [PrefetchRule(name="mr", modality="^MR$", priors=5), PrefetchRule(name="any")]
    assert rule_for(rules, "MR").name == "mr"  # type: ignore[union-attr]
    assert rule_for(rules, "CT").name == "any"  # type: ignore[union-attr]
    assert rule_for(rules[:1], "CT") is None


def test_a_rule_whose_pattern_backtracks_for_ever_is_passed_over(caplog) -> None:  # type: ignore[no-untyped-def]
    """An HL7 order's modality is text from outside: ``(a|aa)+`` on 'a' * 60 + 'b' held the
    GIL for hours in re. The match gives up after 50 ms and the next rule is tried."""
    rules = [PrefetchRule(name="slow", modality="^(a|aa)+$"), PrefetchRule(name="any")]
    assert rule_for(rules, "a" * 60 + "b").name == "any"  # type: ignore[union-attr]
    assert rule_for(rules, "aaaa").name == "slow"  # type: ignore[union-attr]
    assert "did not finish on 'aaaa" in caplog.text and "counted as not matching" in caplog.text


def test_candidate_from_qido_json() -> None:
    row = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00080020": {"vr": "DA",
           "Value": ["20250101"]}, "00080061": {"vr": "CS", "Value": ["CT", "SR"]},
           "00201208": {"vr": "IS", "Value": [62]}}
    assert candidate_from_qido(row) == Candidate("1.2.3", "20250101", "",
                                                 frozenset({"CT", "SR"}), 62)
    assert candidate_from_qido({}) is None


def test_wan_windows_wrap_past_midnight() -> None:
    night = [PrefetchWindow(start="20:00", end="07:00")]
    assert in_window(night, dt.datetime(2026, 11, 23, 23, 0))
    assert in_window(night, dt.datetime(2026, 11, 23, 6, 59))
    assert not in_window(night, dt.datetime(2026, 11, 23, 12, 0))
    assert in_window([], dt.datetime(2026, 11, 23, 12, 0))
    assert next_window_start(night, dt.datetime(2026, 11, 23, 12, 0)) == \
        dt.datetime(2026, 11, 23, 20, 0)
    assert next_window_start([PrefetchWindow(start="06:00", end="07:00")],
                             dt.datetime(2026, 11, 23, 12, 0)) == dt.datetime(2026, 11, 24, 6)


def test_bad_window_and_unknown_push_destination_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"prefetch.windows.0.start: must be HH:MM"):
        load_settings(environ={"PAS_PREFETCH__WINDOWS": '[{start = "25:00", end = "07:00"}]'})
    with pytest.raises(ConfigError, match=r"prefetch.rules.0.push_to: unknown destination 'ws'"):
        load_settings(environ={"PAS_PREFETCH__RULES": '[{name = "r", push_to = ["ws"]}]'})


def test_hl7_encoding_is_validated(tmp_path: Path) -> None:
    """An unknown codec is a config error naming hl7.encoding (it passed ``pas config check``,
    then every message died with LookupError in the listener and no ACK was ever sent)."""
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"PAS_HOME": str(tmp_path), "PAS_HL7__ENCODING": "utf-9"})
    assert refused.value.problems == [
        "hl7.encoding: unknown encoding 'utf-9' (set by PAS_HL7__ENCODING)"]
    for name in ("utf-8", "iso-8859-1", "latin-1", "cp1252"):
        settings = load_settings(environ={"PAS_HOME": str(tmp_path),
                                          "PAS_HL7__ENCODING": name})
        assert settings.hl7.encoding == name
    # Codecs Python knows that cannot carry HL7 over MLLP (the listener's decode raised, or
    # its ACK went out garbled, for every message without MSH-18): refused by name too.
    for name in ("idna", "utf-7", "cp037", "utf-16"):
        with pytest.raises(ConfigError) as refused:
            load_settings(environ={"PAS_HOME": str(tmp_path), "PAS_HL7__ENCODING": name})
        assert refused.value.problems == [
            f"hl7.encoding: {name!r} cannot carry HL7 over MLLP (its ASCII bytes are not read "
            "as ASCII, or it cannot replace a bad byte): use utf-8, iso-8859-1 or cp1252 (set "
            "by PAS_HL7__ENCODING)"], name


def test_hl7_times() -> None:
    local = dt.datetime(2026, 11, 24, 9, 30).timestamp()
    assert parse_hl7_time("202611240930") == local
    assert parse_hl7_time("20261124093000.1234") == local
    assert parse_hl7_time("20261124093000+0100") == \
        dt.datetime(2026, 11, 24, 8, 30, tzinfo=dt.UTC).timestamp()
    assert parse_hl7_time("") is None
    assert parse_hl7_time("20261124093000-0100") == \
        dt.datetime(2026, 11, 24, 10, 30, tzinfo=dt.UTC).timestamp()
    # ISO dates are not HL7 v2 DTM: refused, the reason quoting the whole value (the '-' was
    # taken for a zone offset and the text said '2026'); a short offset is not dropped.
    for bad in ("2026-11-24", "2026-11-24T09:30", "20261124093000+01", "202611", "2026112"):
        with pytest.raises(ValueError) as refused:
            parse_hl7_time(bad)
        assert str(refused.value).startswith(f"not an HL7 date/time: {bad!r} (expected ")


def test_issuer_from_pid3_and_scheduled_time_from_obr27() -> None:
    (order,) = interpret(parse_message("\r".join([
        "MSH|^~\\&|RIS|H|PAS|H|20261123||ORM^O01|X1|P|2.5",
        "PID|1||123^^^CHU-A&1.2.250.1&ISO^PI",
        "ORC|NW|P1|F1",
        "OBR|1|P1|F1|CT^CT|||||||||||CHEST^Chest|||A77||||||CT|||^^^20261124093000",
    ])))
    assert (order.patient_id, order.issuer, order.accession_number) == ("123", "CHU-A", "A77")
    assert (order.modality, order.body_part) == ("CT", "CHEST")
    assert order.scheduled_at == dt.datetime(2026, 11, 24, 9, 30).timestamp()
    assert order.dedup_key == "order:123|CHU-A|P1"
    with pytest.raises(Refusal, match="unsupported message type ORU\\^R01"):
        interpret(parse_message("MSH|^~\\&|A|B|C|D|2026||ORU^R01|Z|P|2.5\rPID|1||9"))
    # An ADT feed's events not read are not refused: ACKed AA, nothing done (orders.handle).
    with pytest.raises(NotUsed, match="ADT\\^A01: not used by PAS's prefetch"):
        interpret(parse_message("MSH|^~\\&|A|B|C|D|2026||ADT^A01|Z|P|2.5\rPID|1||9"))


def test_an_issuer_given_as_an_oid_alone_is_the_oid() -> None:
    """PID-3 whose assigning authority is an OID alone (CX-4.2, IHE PAM and French senders):
    the request's issuer is the OID, and ``prefetch.issuer_map`` may name it to choose the
    repetition. Read as CX-4.1 only, it was stored empty and could not be mapped."""
    def order_of(pid3: str, site_issuers: list[str] | None = None) -> tuple[str, str]:
        (order,) = interpret(parse_message("\r".join([
            "MSH|^~\\&|RIS|H|PAS|H|20261123||ORM^O01|X1|P|2.5", f"PID|1||{pid3}",
            "ORC|NW|P1|F1", "OBR|1|P1|F1|CT^CT|||||||||||||A77||||||CT"])),
            site_issuers=site_issuers or [])
        return order.patient_id, order.issuer

    assert order_of("IPP42^^^&1.2.250.1.71.4.2.1&ISO^PI") == ("IPP42", "1.2.250.1.71.4.2.1")
    ins = "1234567890123^^^&1.2.250.1.213.1.4.8&ISO^INS"
    both = f"{ins}~IPP42^^^&1.2.250.1.71.4.2.1&ISO^PI"
    assert order_of(both) == ("1234567890123", "1.2.250.1.213.1.4.8")  # no map: the first
    assert order_of(both, ["1.2.250.1.71.4.2.1"]) == ("IPP42", "1.2.250.1.71.4.2.1")
    # a namespace with its OID: the namespace, as before, and the map may name either
    named = f"{ins}~IPP42^^^CHU-A&1.2.250.1.71.4.2.1&ISO^PI"
    assert order_of(named, ["1.2.250.1.71.4.2.1"]) == ("IPP42", "CHU-A")
    assert order_of(named, ["chu-a"]) == ("IPP42", "CHU-A")


def test_multipart_parts() -> None:
    body = (b"--abc\r\nContent-Type: application/dicom\r\n\r\nFIRST\r\n--abc\r\n"
            b"Content-Type: application/dicom\r\n\r\nSEC\r\nOND\r\n--abc--\r\n")
    assert multipart_parts('multipart/related; type="application/dicom"; boundary=abc',
                           body) == [b"FIRST", b"SEC\r\nOND"]
    with pytest.raises(RegionError, match="expected multipart/related"):
        multipart_parts("application/json", b"{}")


def test_store_schedules_one_request_per_order(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    request = store.NewRequest("order:P|H|1", "hl7", "P", "H", "A1", "CT", None, 2e9, 1.9e9)
    first = store.record_message(db, "RIS|H|m1", "ORM^O01", "AA", request=request).scheduled
    again = store.record_message(db, "RIS|H|m2", "ORM^O01", "AA", request=request).scheduled
    assert first is not None and first.created and again is not None and not again.created
    assert first.request_id == again.request_id
    assert store.message_seen(db, "RIS|H|m1")["request_fk"] == first.request_id  # type: ignore[index]
    resent = store.record_message(db, "RIS|H|m1", "ORM^O01", "AA", request=request)
    assert not resent.first and resent.scheduled is None  # recognised, nothing counted
    (row,) = store.list_requests(db)
    assert row["times_requested"] == 2 and row["due_at"] == 1.9e9
    assert store.claim_due(db) == []  # not due before 1.9e9
    store.record_message(db, "RIS|H|m3", "ORM^O01", "AA", cancel_key="order:P|H|1")
    assert store.list_requests(db)[0]["state"] == "cancelled"


def test_a_message_is_recorded_with_its_meaning_and_older_rows_compare_as_before(
        tmp_path: Path) -> None:
    """Every message keeps the order it named (``prefetch_messages.detail``), which a resend
    is compared with: its request's key may change since (a merge re-keys it; an order's
    second procedure has a key of its own), the message's meaning does not. A message of one
    order recorded before (2026-12-07: no meaning kept) is still compared with its request's
    key: resent, recognised; its control id reused for another order, a new message. A
    cancel recorded before 2026-12-04 (the bare word ``cancel``) resent is recognised."""
    db = Database(tmp_path / "pas.sqlite")

    def order(number: str) -> store.NewRequest:
        return store.NewRequest(f"order:P|H|{number}", "hl7", "P", "H", "A1", "CT", None,
                                2e9, 1.9e9)

    store.record_message(db, "RIS|H|m1", "ORM^O01", "AA", request=order("1"))
    assert store.message_seen(db, "RIS|H|m1")["detail"] == "order:P|H|1"  # type: ignore[index]
    with db.transaction() as conn:  # as the versions before wrote it
        conn.execute("UPDATE prefetch_messages SET detail = NULL")
    assert not store.record_message(db, "RIS|H|m1", "ORM^O01", "AA", request=order("1")).first
    reused = store.record_message(db, "RIS|H|m1", "ORM^O01", "AA", request=order("2"))
    assert reused.first and reused.reused_for == "order:P|H|1"
    assert sorted((r["dedup_key"], r["times_requested"], r["state"])
                  for r in store.list_requests(db)) == [("order:P|H|1", 1, "pending"),
                                                         ("order:P|H|2", 1, "pending")]
    with db.transaction() as conn:  # a cancel as the versions before 2026-12-04 wrote it
        conn.execute("INSERT INTO prefetch_messages VALUES ('RIS|H|c0', 1.0, 'ORM^O01', "
                     "NULL, 'AA', 'cancel')")
    assert not store.record_message(db, "RIS|H|c0", "ORM^O01", "AA",
                                    cancel_key="order:P|H|1").first
    assert {r["state"] for r in store.list_requests(db)} == {"pending"}


def test_failed_attempts_end_in_failed_and_restart_recovers(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    store.schedule(db, store.NewRequest("manual:P", "manual", "P"))
    (claimed,) = store.claim_due(db)
    assert store.get_request(db, claimed["id"])["state"] == "running"  # type: ignore[index]
    assert store.recover(db) == 1  # a crash left it running: pending again (attempt counted)
    (claimed,) = store.claim_due(db)
    assert store.fail_attempt(db, claimed["id"], "boom", max_attempts=3, retry_at=0) == "pending"
    (claimed,) = store.claim_due(db)
    assert store.fail_attempt(db, claimed["id"], "boom", max_attempts=3, retry_at=0) == "failed"
    assert store.claim_due(db) == []


def test_a_change_of_a_failed_or_cancelled_request_and_one_without_a_time(
        tmp_path: Path) -> None:
    """What the same order's later message does by state (the running and fetched ones
    against a real daemon: tests/test_prefetch_merge.py): a failed request that now asks
    for another exam, or another time, is tried again from its first attempt; the same
    message again changes nothing; a cancelled one stays cancelled; a message with no exam
    time (a status update) keeps the known one: its due time went to now, and a fetch set
    for the day before the exam ran at once."""
    db = Database(tmp_path / "pas.sqlite")

    def order(modality: str, scheduled: float | None, due: float) -> store.NewRequest:
        return store.NewRequest("order:P|H|1", "hl7", "P", "H", "A1", modality, None,
                                scheduled, due)

    store.schedule(db, order("CT", 2e9, 1.9e9))
    store.schedule(db, order("CT", None, 1.0))  # no time given: due stays 1.9e9
    (row,) = store.list_requests(db)
    assert (row["scheduled_at"], row["due_at"], row["next_attempt_at"]) == (2e9, 1.9e9, 1.9e9)
    store.schedule(db, order("CT", 3.0, 1.0))  # now due at once (1.0 is in the past)
    for _ in range(2):
        (claimed,) = store.claim_due(db)
        store.fail_attempt(db, claimed["id"], "boom", max_attempts=2, retry_at=0,
                           searched=claimed)
    assert store.list_requests(db)[0]["state"] == "failed"
    store.schedule(db, order("CT", 3.0, 1.0))  # the same again: nothing to try again for
    assert store.list_requests(db)[0]["state"] == "failed"
    store.schedule(db, order("MR", None, 1.0))
    (row,) = store.list_requests(db)
    assert (row["state"], row["attempts"], row["modality"], row["last_error"],
            row["finished_at"]) == ("pending", 0, "MR", None, None), row
    (claimed,) = store.claim_due(db)
    store.defer(db, claimed["id"], 0.0, "waiting for the link: ConnectError: refused")
    (claimed,) = store.claim_due(db)
    store.record_message(db, "RIS|H|c", "ORM^O01", "AA", cancel_key="order:P|H|1")
    assert store.fail_attempt(db, claimed["id"], "boom", 2, 0, claimed) == "cancelled"
    # It said "waiting for the link: ..." once cancelled, as if it still waited.
    assert store.list_requests(db)[0]["last_error"] is None
    store.schedule(db, order("US", 4.0, 1.0))
    (row,) = store.list_requests(db)
    assert (row["state"], row["modality"], row["scheduled_at"]) == ("cancelled", "MR", 3.0)


def test_a_status_update_without_an_accession_keeps_the_one_known(tmp_path: Path) -> None:
    """NW with OBR-18 ``ACC123``, then ``ORC|SC`` with OBR-18 empty, or no OBR at all: the
    request keeps ACC123 (it became the order number ``F1``, ORC-3, and the priors' choice no
    longer left the current exam out). An order giving no OBR-18 has its order number as
    accession until one comes (a RIS writing the accession in ORC-3: never its own prior)."""
    from appliance.prefetch import orders

    db = Database(tmp_path / "pas.sqlite")
    msh = "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261207||ORM^O01|{}|P|2.5\rPID|1||P1^^^HOSP\r"

    def send(control: str, *segments: str) -> str:
        text = msh.format(control) + "\r".join(segments)
        return orders.handle(db, text, "test", lambda _: 0.0)[0]

    def accessions() -> list[tuple[str, str | None]]:
        return [(r["dedup_key"], r["accession_number"]) for r in store.list_requests(db)]

    obr = "OBR|1|{}|F1|||||||||||||||{}||||||CT"
    assert "MSA|AA|A1" in send("A1", "ORC|NW|ORD1|F1||SC||^^^20991231120000",
                               obr.format("ORD1", "ACC123"))
    assert "MSA|AA|A2" in send("A2", "ORC|SC|ORD1|F1||IP", obr.format("ORD1", ""))
    assert "MSA|AA|A3" in send("A3", "ORC|SC|ORD1|F1||IP")
    assert accessions() == [("order:P1|HOSP|ORD1", "ACC123")]
    assert store.list_requests(db)[0]["times_requested"] == 3

    assert "MSA|AA|B1" in send("B1", "ORC|NW|ORD2|F2||SC||^^^20991231120000",
                               obr.format("ORD2", ""))
    assert dict(accessions())["order:P1|HOSP|ORD2"] == "F2"
    assert "MSA|AA|B2" in send("B2", "ORC|SC|ORD2|F2||IP", obr.format("ORD2", "ACC2"))
    assert "MSA|AA|B3" in send("B3", "ORC|SC|ORD2|F2||IP")
    assert dict(accessions())["order:P1|HOSP|ORD2"] == "ACC2"

    # Cancelled, then ordered again without OBR-18: revived, its accession kept (it became
    # the order number F1 there too, until 2026-12-07).
    assert "MSA|AA|C1" in send("C1", "ORC|CA|ORD1|F1", obr.format("ORD1", "ACC123"))
    assert "MSA|AA|C2" in send("C2", "ORC|NW|ORD1|F1||SC||^^^20991231120000",
                               obr.format("ORD1", ""))
    revived = next(r for r in store.list_requests(db) if r["dedup_key"].endswith("|ORD1"))
    assert (revived["state"], revived["accession_number"]) == ("pending", "ACC123")


def test_outside_the_wan_windows_a_due_request_waits_for_the_next_opening(
        tmp_path: Path) -> None:
    """No region is touched: the request is deferred before any network use."""
    from appliance.ingest.receive import Receiver
    from appliance.prefetch.service import PrefetchService
    from appliance.store.spool import Spool

    now = dt.datetime.now()
    opening = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    closing = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    settings = load_settings(environ={
        "PAS_HOME": str(tmp_path),
        "PAS_PREFETCH__WINDOWS": f'[{{start = "{opening}", end = "{closing}"}}]'})
    db = Database(settings.db_path)

    def no_region() -> None:
        raise AssertionError("the region must not be contacted outside the windows")

    service = PrefetchService(settings, db, Receiver(db, Spool(settings.spool_dir)),
                              region_factory=no_region)  # type: ignore[arg-type]
    store.schedule(db, store.NewRequest("manual:W", "manual", "W"))
    (request,) = store.claim_due(db)
    service.fetcher.process(request)
    row = store.get_request(db, request["id"])
    assert row is not None and row["state"] == "pending" and row["attempts"] == 0
    assert "outside the WAN windows" in row["last_error"]
    expected = dt.datetime.combine(now.date(), dt.time.fromisoformat(opening))
    if expected <= now:
        expected += dt.timedelta(days=1)
    assert row["next_attempt_at"] == expected.timestamp()
    service.stop()


def test_a_test_pas_takes_the_processing_ids_it_is_given(tmp_path: Path) -> None:
    """``hl7.processing_ids = ["T"]`` (a test PAS fed by a test RIS): T acted on, P refused;
    the variable's JSON list is read as the file's list."""
    from appliance.prefetch import orders

    assert load_settings(environ={"PAS_HL7__PROCESSING_IDS": '["T"]'}).hl7.processing_ids \
        == ["T"]
    db = Database(tmp_path / "pas.sqlite")
    message = ("MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261206||ORM^O01|{id}|{processing}|2.5\r"
               "PID|1||P9^^^HOSP\rORC|NW|O9\rOBR|1|O9||CT^CT||||||||||||||A9||||||CT")
    answers = {processing: orders.handle(db, message.format(id=processing, processing=processing),
                                         "test", lambda _: 0.0, (), ("T",))[0]
               for processing in ("P", "T")}
    assert "|AR|P|processing id P (MSH-11): this PAS acts on T only" in answers["P"]
    assert "MSA|AA|T" in answers["T"]
    assert [r["dedup_key"] for r in store.list_requests(db)] == ["order:P9|HOSP|O9"]
