"""The live ticker page (``GET /``) in a real headless Chromium, driven over the DevTools
protocol: it connects, subscribes and its price cells follow the feed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.gateway.helpers import Stack, fresh_seqs
from tests.support.procs import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ARTIFACT = REPO / "test-artifacts" / "gateway-page.png"
EMPTY = "\N{EN DASH}"  # what the page shows in a cell without a value
INSTALL_HINT = (
    "headless Chromium is needed for the web page test: apt-get install -y chromium "
    "(scripts/install-servers.sh installs it)"
)


class DevTools:
    """Minimal Chrome DevTools protocol client: one page target, request/response only."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if reply.get("id") == call_id:
                assert "error" not in reply, (method, reply)
                result: dict[str, Any] = reply["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page, ``None`` while the page is (re)loading."""
        call_id = next(self._ids)
        params = {"expression": expression, "returnByValue": True}
        await self.ws.send(
            json.dumps({"id": call_id, "method": "Runtime.evaluate", "params": params})
        )
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if reply.get("id") == call_id:
                # during navigation the context can vanish under the call: not ready yet
                if "error" in reply or "exceptionDetails" in reply["result"]:
                    return None
                return reply["result"]["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail(INSTALL_HINT)
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the wait below is async
        [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--window-size=1200,600", "--remote-debugging-port=0", "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium never opened its DevTools port"
            await asyncio.sleep(0.05)
        port = port_file.read_text().splitlines()[0]
        with_page = await asyncio.to_thread(_page_target, int(port))
        async with websockets.connect(with_page, max_size=2**26) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _page_target(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        targets = json.loads(response.read())
    url: str = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
    return url


ROWS = """(() => {
  const status = document.getElementById("status");
  if (!status) return null;  // still about:blank or loading
  return JSON.stringify({
    status: status.textContent,
    rows: Object.fromEntries([...document.querySelectorAll("#rows tr")].map(
      tr => [tr.dataset.product, tr.querySelector(".price").textContent]))
  });
})()"""


async def test_the_page_shows_live_prices_that_update(default_gw: Stack, tmp_path: Path) -> None:
    """The page lists the served products, goes ``live`` over /ws and its price cells change
    as ticks arrive, each showing a published price; a screenshot is kept under
    test-artifacts/."""
    feed = default_gw.feed
    products = ["BTC-USD", "ETH-USD"]
    stop = asyncio.Event()

    async def produce() -> None:
        while not stop.is_set():
            seq = fresh_seqs(1)[0]
            await feed.publish((p, seq) for p in products)
            await asyncio.sleep(0.1)

    producer = asyncio.create_task(produce())
    try:
        async with chromium(tmp_path / "profile") as page:
            await page.call("Page.enable")
            await page.call("Page.navigate", url=default_gw.gateway.http + "/")
            deadline = time.monotonic() + 20
            while True:
                raw = await page.evaluate(ROWS)
                first = json.loads(raw) if raw else {"status": None, "rows": {}}
                if first["status"] == "live" and all(
                    first["rows"].get(p, EMPTY) != EMPTY for p in products
                ):
                    break
                assert time.monotonic() < deadline, f"page never went live: {first}"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            raw = await page.evaluate(ROWS)
            assert raw, "the page went away"
            second = json.loads(raw)
            shot = await page.call("Page.captureScreenshot", format="png")
    finally:
        stop.set()
        await producer
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_bytes(base64.b64decode(shot["data"]))
    assert second["status"] == "live"
    prices = {p: {feed.json(p, s)["price"] for s in feed.published[p]} for p in products}
    for product in products:
        assert first["rows"][product] != second["rows"][product], f"{product} did not update"
        assert second["rows"][product] in prices[product]
