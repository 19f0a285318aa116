"""Coinbase-Exchange-compatible market-data feed simulator and replayer (dev/test tool).

Programmatic use (tests, benchmarks)::

    from services.feedsim import FeedSim, FeedSimSettings

    async with FeedSim(FeedSimSettings(port=0, products=["BTC-USD"], rate=500)) as sim:
        ...  # connect to sim.ws_url; GET f"{sim.http_url}/products/BTC-USD/ticker"

See services/feedsim/README.md for the CLI, the fault spec and the stats JSON.
"""

from services.feedsim.errors import FaultSpecError, FeedSimError, ReplayFileError
from services.feedsim.faults import FaultSpec, parse_faults
from services.feedsim.settings import FeedSimSettings
from services.feedsim.sim import FeedSim, ListenError

__all__ = [
    "FaultSpec",
    "FaultSpecError",
    "FeedSim",
    "FeedSimError",
    "FeedSimSettings",
    "ListenError",
    "ReplayFileError",
    "parse_faults",
]
