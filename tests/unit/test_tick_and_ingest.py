"""Codec, TraderMade parsing, sequencing, backoff: the ingestor's pure parts."""

from __future__ import annotations

import random

import orjson
import pytest

from ingestor.backoff import Backoff
from ingestor.sequencer import Sequencer
from ingestor.vendors.tradermade import MalformedMessage, login_frame, parse_message
from shared.tick import (
    Position,
    Quote,
    Tick,
    decode_tick,
    encode_tick,
    mark_snapshot,
    position_of,
    to_tradermade,
)

TICK = Tick("EURUSD", 1.08512, 1.08519, 1.085155, 1732186000123, "e7", 1235)


def test_encoded_tick_is_the_native_frame_and_round_trips() -> None:
    payload = encode_tick(TICK)
    assert orjson.loads(payload) == {"type": "tick", "symbol": "EURUSD", "bid": 1.08512, "ask": 1.08519,
                                     "mid": 1.085155, "ts": 1732186000123, "epoch": "e7", "seq": 1235}
    assert decode_tick(payload) == TICK


def test_position_is_read_without_decoding_even_with_fields_after_it() -> None:
    assert position_of(encode_tick(TICK)) == Position("e7", 1235)
    assert position_of(b'{"epoch":"a-b_9","seq":77,"snapshot":true}') == Position("a-b_9", 77)
    for bad in (b'{"x":1}', b'{"seq":77}', b'{"epoch":"e1"}', b'{"epoch":"e1","seq":x}'):
        with pytest.raises(ValueError):
            position_of(bad)


def test_snapshot_and_tradermade_forms() -> None:
    payload = encode_tick(TICK)
    assert orjson.loads(mark_snapshot(payload))["snapshot"] is True
    assert orjson.loads(to_tradermade(payload)) == {
        "symbol": "EURUSD", "ts": "1732186000123", "bid": 1.08512, "ask": 1.08519, "mid": 1.085155}


def test_tradermade_tick_parses_with_string_or_int_ts() -> None:
    q = parse_message('{"symbol":"EURUSD","ts":"1732186000123","bid":1.1,"ask":1.2,"mid":1.15}')
    assert q == Quote("EURUSD", 1.1, 1.2, 1.15, 1732186000123)
    q2 = parse_message('{"symbol":"GBPUSD","ts":5,"bid":"1.1","ask":1.3}')
    assert q2 is not None and q2.mid == pytest.approx(1.2)


def test_vendor_texts_are_notices_not_ticks() -> None:
    assert parse_message("Connected") is None
    assert parse_message("User Key Used to many times") is None


@pytest.mark.parametrize("raw", [
    "{broken", '{"symbol":"EURUSD","ts":"1","bid":1,"ask":"x"}',
    '{"symbol":"eurusd","ts":"1","bid":1,"ask":2}',
    '{"symbol":"EURUSD","ts":"x","bid":1,"ask":2}', '{"symbol":"EURUSD","ts":"1","bid":"NaN","ask":2}',
    '{"symbol":"EURUSD","ts":"1","ask":2}', '{"symbol":"EURUSD","ts":"1","bid":true,"ask":2}',
])
def test_malformed_upstream_messages_raise(raw: str) -> None:
    with pytest.raises(MalformedMessage):
        parse_message(raw)


def test_login_frame() -> None:
    frame = orjson.loads(login_frame("k", ["EURUSD", "GBPUSD"]))
    assert frame == {"userKey": "k", "symbol": "EURUSD,GBPUSD"}


def test_sequencer_grows_by_one_per_symbol_and_continues_from_last() -> None:
    seq = Sequencer()
    seq.merge({"EURUSD": encode_tick(TICK), "BAD": b"garbage"})
    q = Quote("EURUSD", 1, 2, 1.5, 1)
    assert [(t.epoch, t.seq) for t in (seq.number(q) for _ in range(3))] == [
        ("e7", 1236), ("e7", 1237), ("e7", 1238)]
    first = seq.number(Quote("GBPUSD", 1, 2, 1.5, 1))
    assert first.seq == 1 and first.epoch not in ("", "e7")


def test_sequencer_keeps_its_own_numbers_when_redis_lost_them_and_follows_a_newer_epoch() -> None:
    seq = Sequencer()
    seq.merge({"EURUSD": encode_tick(TICK)})
    q = Quote("EURUSD", 1, 2, 1.5, 1)
    seq.number(q)  # e7:1236
    seq.merge({})  # Redis came back empty: memory continues, no new epoch
    assert (seq.number(q).epoch, seq.number(q).seq) == ("e7", 1238)
    older = encode_tick(Tick("EURUSD", 1, 2, 1.5, 1, "e7", 1000))
    seq.merge({"EURUSD": older})  # an older copy (AOF behind memory) never moves seq back
    assert seq.number(q).seq == 1239
    other = encode_tick(Tick("EURUSD", 1, 2, 1.5, 1, "e9", 5))
    seq.merge({"EURUSD": other})  # another leader numbered it since: follow that stream
    assert (seq.number(q).epoch, seq.number(q).seq) == ("e9", 7)


def test_new_epochs_are_never_reused() -> None:
    from shared.tick import new_epoch

    assert len({new_epoch() for _ in range(10_000)}) == 10_000


def test_backoff_grows_exponentially_with_jitter_up_to_max_and_resets() -> None:
    b = Backoff(initial=1.0, maximum=8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(6)]
    for d, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= d <= ceiling
    b.reset()
    assert b.next_delay() <= 1.0


def test_upstream_urls_are_logged_without_credentials_or_query() -> None:
    from ingestor.vendors.supervise import loggable

    assert loggable("wss://user:s3cret@feed.example:8443/feedadv?api_key=abc") == "wss://feed.example:8443/feedadv"


def test_key_record_round_trips_and_a_broken_one_counts_as_disabled() -> None:
    from shared.keystore import KeyRecord

    record = KeyRecord("alice", ("EUR*", "GBPUSD"), 3, False, 1700000000000)
    raw = {k.encode(): v.encode() for k, v in record.to_hash().items()}
    assert KeyRecord.from_hash(raw) == record
    assert record.allows("EURJPY") and record.allows("GBPUSD") and not record.allows("GBPJPY")
    broken = KeyRecord.from_hash({b"name": b"bob", b"max_connections": b"many"})
    assert broken.disabled and broken.name == "bob"
    assert KeyRecord.from_hash({b"symbols": b"*"}).disabled
