"""The newest tick per product from MD_TICKS, when the newest message is not a tick."""

from __future__ import annotations

import nats
import pytest

from services.common import broker
from services.common.laststate import load_last_ticks
from services.common.models import Tick, encode_tick
from services.common.settings import CommonSettings
from services.common.subjects import tick_subject
from services.devstack.servers import NatsServer
from tests.support.metrics import local_value

pytestmark = pytest.mark.integration


def _tick(product: str, seq: int) -> bytes:
    return encode_tick(
        Tick(product=product, seq=seq, trade_id=seq, time="2026-11-29T12:00:00Z", recv_ns=seq,
             price="1.00", size="1", side="buy", bid=None, bid_size=None, ask=None,
             ask_size=None, open_24h=None, high_24h=None, low_24h=None, volume_24h=None)
    )  # fmt: skip


async def test_a_product_whose_newest_message_is_not_a_tick_keeps_its_last_tick(
    nats_server: NatsServer,
) -> None:
    """BTC-USD's newest messages are garbage or another product's tick (three of them, with
    hundreds of other messages in between): its newest readable tick (seq 5) is the answer,
    not nothing. The product
    was dropped, so a restarted normalizer forgot its seq (and the gateway its snapshot).
    A product with nothing readable is absent; every unreadable message met is counted."""
    nc = await nats.connect(nats_server.url)
    try:
        settings = CommonSettings(nats_urls=[nats_server.url])
        publisher = broker.Publisher(nc, settings)
        await broker.ensure_streams(publisher.js, settings)
        js = nc.jetstream()
        btc, eth, bad = (tick_subject(p, 4) for p in ("BTC-USD", "ETH-USD", "BAD-USD"))
        for seq in range(1, 6):
            await js.publish(btc, _tick("BTC-USD", seq))
        for seq in range(1, 300):
            await js.publish(eth, _tick("ETH-USD", seq))
        await js.publish(btc, b"not a tick")
        for seq in range(300, 600):
            await js.publish(eth, _tick("ETH-USD", seq))
        await js.publish(btc, b'{"type": "tick"}')
        await js.publish(btc, _tick("ETH-USD", 1000))  # a tick, but not BTC-USD's
        await js.publish(bad, b"never a tick")
        before = local_value("ledgerflux_unreadable_ticks_total")
        last = await load_last_ticks(js)
    finally:
        await nc.close()
    assert {p: s.tick.seq for p, s in last.items()} == {"BTC-USD": 5, "ETH-USD": 599}
    assert last["BTC-USD"].data == _tick("BTC-USD", 5)
    assert local_value("ledgerflux_unreadable_ticks_total") - before == 4
