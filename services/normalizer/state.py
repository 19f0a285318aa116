"""Per-product output order: the last ``seq`` published, recovered from MD_TICKS at start."""

from __future__ import annotations

from nats.js import JetStreamContext

from services.common.laststate import load_last_ticks
from services.common.logging import get_logger

log = get_logger(__name__)


async def recover_last_seqs(js: JetStreamContext, shards: frozenset[int]) -> dict[str, int]:
    """The newest ``seq`` per product stored in MD_TICKS for the given shards."""
    last = {
        product: stored.tick.seq for product, stored in (await load_last_ticks(js, shards)).items()
    }
    log.info("sequence_state_recovered", products=len(last))
    return last
