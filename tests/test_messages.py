"""Topics and payloads: one namespace, strict versioned schemas, fixed rejection reasons."""

from __future__ import annotations

import pytest

from controller.protocol.payloads import (
    GroupCommand,
    MeterTelemetry,
    MinerCommand,
    MinerTelemetry,
    PayloadError,
    PriceSignal,
    Setpoint,
    decode,
)
from controller.protocol.topics import Kind, SiteTopics

T = SiteTopics("site-1")


@pytest.mark.parametrize(
    ("topic", "kind", "device"),
    [
        ("mineops/site-1/miner/m-1/telemetry", Kind.MINER_TELEMETRY, "m-1"),
        ("mineops/site-1/miner/m-1/availability", Kind.MINER_AVAILABILITY, "m-1"),
        ("mineops/site-1/group/r1/cmd", Kind.GROUP_CMD, "r1"),
        ("mineops/site-1/meter/poi/telemetry", Kind.METER_TELEMETRY, "poi"),
        ("mineops/site-1/signal/price", Kind.PRICE, ""),
        ("mineops/site-1/signal/grid", Kind.GRID, ""),
        ("mineops/site-1/controller/decision", Kind.DECISION, ""),
        ("mineops/other/signal/price", Kind.UNKNOWN, ""),
        ("mineops/site-1/miner/m-1/telemetry/extra", Kind.UNKNOWN, ""),
        ("mineops/site-1/miner/m-1/bogus", Kind.UNKNOWN, ""),
        ("elsewhere", Kind.UNKNOWN, ""),
    ],
)
def test_topics_round_trip(topic: str, kind: Kind, device: str) -> None:
    parsed = T.parse(topic)
    assert (parsed.kind, parsed.device) == (kind, device)


def test_builders_match_the_parser() -> None:
    assert T.parse(T.miner("a", "cmd")).kind is Kind.MINER_CMD
    assert T.parse(T.group("r", "telemetry")).kind is Kind.GROUP_TELEMETRY
    assert T.parse(T.meter("poi")).kind is Kind.METER_TELEMETRY
    assert T.parse(T.price).kind is Kind.PRICE
    assert T.parse(T.controller_availability).kind is Kind.CONTROLLER_AVAILABILITY


def test_payloads_round_trip() -> None:
    cmd = MinerCommand(seq=7, ts=1.0, action="set_power", power_w=3000)
    assert decode(MinerCommand, cmd.encode()) == cmd
    group = GroupCommand(seq=8, ts=1.0, targets={"a": Setpoint(action="sleep")})
    assert decode(GroupCommand, group.encode()) == group
    price = PriceSignal(ts=5.0, price_usd_per_mwh=-3.37)
    assert decode(PriceSignal, price.encode()).price_usd_per_mwh == -3.37


@pytest.mark.parametrize(
    ("model", "raw", "reason"),
    [
        (MinerTelemetry, b"\xff\xfe", "bad_json"),
        (MinerTelemetry, b'{"v":1,"ts":0,"state":"running","power_w":1e9,"hashrate_ths":1}',
         "out_of_range"),
        (MinerTelemetry, b'{"v":1,"ts":0,"state":"dancing","power_w":1,"hashrate_ths":1}',
         "wrong_type"),
        (MinerTelemetry, b'{"v":1,"ts":0,"state":"running","power_w":1,"hashrate_ths":1,'
                         b'"extra":1}', "bad_schema"),
        (MeterTelemetry, b'{"v":1,"ts":0,"power_w":1,"frequency_hz":99}', "out_of_range"),
        (MeterTelemetry, b'{"v":1,"ts":0,"power_w":Infinity}', "out_of_range"),
        (MeterTelemetry, b'{"v":3,"ts":0,"power_w":1}', "bad_version"),
        (PriceSignal, b" " * 5000, "oversized"),
    ],
)
def test_decode_rejects_with_a_fixed_reason(model: type, raw: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as e:
        decode(model, raw)
    assert e.value.reason == reason
