"""End to end in headless Chromium: a cluster with the monitor, jobs, the page, the buttons.

Chromium (Debian's /usr/bin/chromium, installed by scripts/install-browser.sh) is driven with
the Chrome DevTools Protocol over its websocket, with aiohttp's client: no driver, no
downloaded browser. Screenshots go to the test's tmp_path and to test-artifacts/monitor/.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import clusterpy
from clusterpy.job import JobStatus

from .test_monitor import wait_for_file

aiohttp = pytest.importorskip("aiohttp", reason="the monitor needs aiohttp (pip install 'clusterpy[monitor]')")

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "monitor"
CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: scripts/install-browser.sh installs Debian's chromium")


class Browser:
    """One headless Chromium process and its DevTools websocket (flattened sessions)."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: Any = None
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.problems: list[str] = []  # console errors and uncaught exceptions of the page

    async def start(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        self._log = open(self.profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-proxy-server", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "about:blank"],
            stdout=self._log, stderr=self._log, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start:\n{(self.profile.parent / 'chromium.log').read_text()}")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().split()
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.problems.append(json.dumps(data["params"]["exceptionDetails"])[:2000])
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                self.problems.append(data["params"]["entry"]["text"])
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.problems.append(json.dumps(data["params"]["args"])[:2000])

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        msg_id = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(fut, 30)

    async def open(self, url: str, width: int = 1400, height: int = 1000) -> str:
        """A new tab showing ``url``; returns its session id."""
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable", session=session)
        await self.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        await self.send("Page.navigate", {"url": url}, session)
        return session

    async def js(self, session: str, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, session: str, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(session, expression)
            if value:
                return value
            if time.monotonic() > deadline:
                shown = await self.js(session, "document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out waiting for {expression!r}; the page shows:\n{shown}")
            await asyncio.sleep(0.1)

    async def screenshot(self, session: str, *paths: Path) -> bytes:
        shot = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
        data = base64.b64decode(shot["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return data

    async def aclose(self) -> None:
        try:
            if self.ws is not None and not self.ws.closed:
                try:
                    await asyncio.wait_for(self.send("Browser.close"), 5)
                except (RuntimeError, TimeoutError, ConnectionError, aiohttp.ClientError):
                    pass
                await self.ws.close()
            if self.reader is not None:
                self.reader.cancel()
                await asyncio.gather(self.reader, return_exceptions=True)
            if self.http is not None:
                await self.http.close()
        finally:
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
                try:  # the browser's helpers share its process group (its own session)
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if self.proc.poll() is None:
                    self.proc.wait(10)
            self._log.close()


@pytest.fixture
async def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile")
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()


def text_of(element_id: str) -> str:
    return f"document.getElementById({element_id!r}).textContent"


async def test_the_page_shows_the_cluster_live_and_its_buttons_work(browser, tmp_path):
    gate = str(tmp_path / "gate")
    cluster = await asyncio.to_thread(clusterpy.JobCluster, wait_for_file, local=True, local_cpus=2, monitor=True,
                                      prefetch=0)
    try:
        jobs = [cluster.submit(gate, n) for n in (1, 2, 3, -4, 5, 6, 7, 8)]
        page = await browser.open(cluster.monitor_url)

        # the live page: one node row, two jobs running, six queued
        await browser.until(page, "document.querySelectorAll('#nodes tbody tr[data-node]').length === 1")
        await browser.until(page, f"{text_of('count-Running')} === '2' && {text_of('count-Created')} === '6'")
        row = await browser.js(page, "document.querySelector('#nodes tbody tr[data-node]').innerText")
        assert "connected" in row and "127.0.0.1" in row
        assert await browser.js(page, "document.querySelectorAll('#running tbody tr[data-job]').length") == 2
        assert await browser.js(page, "location.search") == ""  # the token left the address bar
        assert await browser.js(page, text_of("live")) == "live"
        await browser.screenshot(page, tmp_path / "monitor-running.png", ARTIFACTS / "monitor-running.png")

        # the page's cancel button (press twice: it asks on the button) cancels the oldest running job
        first = await browser.js(page, "document.querySelector('#running tbody tr[data-job]').dataset.job")
        await browser.js(page, "(() => { const b = document.querySelector('#running tbody tr[data-job] button');"
                               " b.click(); b.click(); })()")
        await browser.until(page, f"{text_of('count-Cancelled')} === '1'")
        cancelled = next(job for job in jobs if job._key == first)
        assert cancelled.status is JobStatus.Cancelled

        # the jobs finish: the counts, the node's numbers, the failure and the chart follow
        Path(gate).touch()
        await asyncio.to_thread(cluster.wait, 30)
        await browser.until(page, f"{text_of('count-Finished')} === '6' && {text_of('count-Terminated')} === '1'")
        await browser.until(page, "document.querySelector('#nodes tbody tr[data-node] [data-field=jobs_done]')"
                                  ".textContent === '8'")
        assert await browser.js(page, f"{text_of('count-Running')} + '/' + {text_of('count-Created')}") == "0/0"
        assert await browser.js(page, text_of("count-submitted")) == "8"
        failure = await browser.js(page, "document.querySelector('#failures details').innerText")
        assert "ValueError: job -4 failed on purpose" in failure
        await browser.js(page, "document.querySelector('#failures details').open = true")
        traceback = await browser.js(page, "document.querySelector('#failures details pre').textContent")
        assert "wait_for_file" in traceback and "Traceback" in traceback
        painted = await browser.js(page, """(() => {
            const c = document.getElementById('chart');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let blue = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 180 && d[i] < 100) blue++;
            return blue; })()""")
        assert painted > 20, "the throughput chart drew no bar"
        png = await browser.screenshot(page, tmp_path / "monitor-done.png", ARTIFACTS / "monitor-done.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

        # the page's "stop using" button: the node is dropped and shown as stopped
        await browser.js(page, "(() => { const b = document.querySelector('#nodes tbody tr[data-node] button');"
                               " b.click(); b.click(); })()")
        await browser.until(page, "document.querySelector('#nodes tbody tr[data-node]').dataset.state === 'stopped'")
        assert browser.problems == [], browser.problems  # no script error, no CSP violation
    finally:
        await asyncio.to_thread(cluster.close)

    # the page notices the monitor went away
    await browser.until(page, f"{text_of('live')} !== 'live'")


async def test_a_page_without_the_token_shows_nothing(browser):
    cluster = await asyncio.to_thread(clusterpy.JobCluster, pow, local=True, local_cpus=1, monitor=True)
    try:
        page = await browser.open(cluster.monitor_url.split("?")[0])
        text = await browser.until(page, "document.body && document.body.innerText")
        assert "token is missing" in text
        assert await browser.js(page, "document.querySelector('#nodes')") is None
    finally:
        await asyncio.to_thread(cluster.close)
