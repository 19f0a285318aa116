"""``--delivery-log``: every ticker frame actually written to a client socket, one CSV line.

``--emit-log`` records what the market *generated*; an auditor of a pipeline needs what
went out on the wire: a ticker generated while no client was connected, or while the
client was stalled, was never sent, and a subscribe snapshot was sent without being
generated again. One line per (frame, client), in the order the frames were written::

    <ns>,<conn_id>,<product_id>,<sequence>,<trade_id>,<kind>

``ns`` is the emission time (epoch ns), ``conn_id`` the simulator's connection number.
``kind`` is ``ticker``; ``dup`` (the second copy of a duplicated ticker); ``reorder``
(a held ticker, written right after the one that overtook it); ``held`` (a held ticker
released at the end of the feed); ``snapshot`` (the product's last ticker, sent on
subscribe); or ``malformed:<variant>`` (the broken frame sent instead of the ticker whose
sequence and trade id the line carries). A frame counts as written when it was handed to
the connection's transport; what happens to it after that (a client killed with bytes in
its socket buffer) is the receiver's business.

Lines are buffered and written by a background task (see :class:`LineFile`); with the
option off nothing of this runs on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from services.feedsim.emitlog import LineFile


class _Ids(msgspec.Struct):
    sequence: int = -1
    trade_id: int = -1


_decode_ids = msgspec.json.Decoder(_Ids).decode


def ticker_ids(frame: bytes) -> tuple[int, int]:
    """``(sequence, trade_id)`` of an encoded ticker (``-1`` for a field it lacks)."""
    ids = _decode_ids(frame)
    return ids.sequence, ids.trade_id


class DeliveryLog(LineFile):
    def record(
        self, ns: int, conn_ids: Iterable[int], product: str, frame: bytes, kind: str
    ) -> None:
        """One line per connection ``frame`` (a ticker, or the one a malformed frame
        replaced) was written to."""
        sequence, trade_id = ticker_ids(frame)
        for conn_id in conn_ids:
            self.append(
                b"%d,%d,%s,%d,%d,%s\n"
                % (ns, conn_id, product.encode(), sequence, trade_id, kind.encode())
            )
