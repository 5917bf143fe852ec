"""The device's side of the negotiation, while ``lazycat-client up`` runs.

Two channels to the box, both inside the tunnel (``transport/negotiation.py`` has the messages):

- the **configuration** (names, a fresh relay ticket, the control port) arrives as a
  ``wire.Control`` frame on ``CONFIG_CHANNEL`` when the session comes up; if none came
  ``ask_after`` seconds after connecting we ask again, and keep asking with backoff;
- the **device control socket**, a WebSocket to ``[<box overlay address>]:<control port>``
  through the TUN: we send our candidates (``hello``) when it opens, whenever they change and
  at once after a network change, and our netcheck report; the box answers with ``punch``:
  its candidates and when to start probing them. It reconnects with backoff (1 s … 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from ipaddress import IPv6Address
from typing import Any

from transport import negotiation as neg
from transport import wire
from transport.peer import CandidatesChanged, Connected, Disconnected, FrameReceived, PeerEvent
from transport.peer_aio import PeerDriver

log = logging.getLogger("lazycat.control")

DEBOUNCE = 0.05  # seconds: candidates often change in bursts (STUN answers, a new address)
RECONNECT_FIRST, RECONNECT_MAX = 1.0, 30.0
OPEN_TIMEOUT = 5.0


class DeviceControl:
    """Runs both channels for one box. ``on_config`` gets each configuration the box sends;
    ``stats`` counts what happened (for ``status`` and the tests)."""

    def __init__(
        self,
        driver: PeerDriver,
        box_key: bytes,
        box_address: IPv6Address,
        *,
        version: str,
        on_config: Callable[[neg.Config], None] | None = None,
        control_port: int = neg.CONTROL_PORT,
        ask_after: float = 3.0,
        dialer: Callable[[IPv6Address, int], Awaitable[socket.socket]] | None = None,
    ) -> None:
        self.driver = driver
        self.box_key = box_key
        self.box_address = box_address
        self.version = version
        self.on_config = on_config
        self.control_port = control_port
        self.ask_after = ask_after
        # proxy mode: the host has no route to the overlay, so the socket is made where the
        # tunnel's TUN is (``PrivateNetns.dial``); None: an ordinary connect through the TUN
        self.dialer = dialer
        self.stats = {"configs": 0, "hellos": 0, "punches": 0, "connects": 0, "errors": 0}
        self.last_error = ""
        self.socket_open = False
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._dirty = asyncio.Event()
        self._network_changed = False
        self._netcheck: dict[str, Any] | None = None
        self._sent: list[dict[str, Any]] | None = None
        self._config_seen = False
        self._tasks: list[asyncio.Task[None]] = []
        driver.callbacks.append(self._on_event)
        driver.network_callbacks.append(self._on_network_changed)

    @property
    def url(self) -> str:
        return f"ws://[{self.box_address}]:{self.control_port}{neg.CONTROL_PATH}"

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._socket(), name="control-socket"),
            loop.create_task(self._ask_config(), name="control-config"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        with contextlib.suppress(ValueError):
            self.driver.callbacks.remove(self._on_event)
        with contextlib.suppress(ValueError):
            self.driver.network_callbacks.remove(self._on_network_changed)

    def report_netcheck(self, report: dict[str, Any]) -> None:
        """Send this netcheck report (``NetcheckReport.to_json()``) once the socket is open."""
        self._netcheck = report
        self._dirty.set()

    # --- events from the tunnel -------------------------------------------------------------

    def _on_event(self, event: PeerEvent) -> None:
        if isinstance(event, Connected) and event.peer_key == self.box_key:
            self._connected.set()
            self._disconnected.clear()
        elif isinstance(event, Disconnected) and event.peer_key == self.box_key:
            self._connected.clear()
            self._disconnected.set()
        elif isinstance(event, CandidatesChanged):
            self._dirty.set()
        elif (
            isinstance(event, FrameReceived)
            and event.peer_key == self.box_key
            and isinstance(event.frame, wire.Control)
            and event.frame.channel == neg.CONFIG_CHANNEL
        ):
            self._config(event.frame.data)

    def _on_network_changed(self) -> None:
        self._network_changed = True
        self._dirty.set()

    def _config(self, data: bytes) -> None:
        try:
            config = neg.parse_box_message(json.loads(data))
        except (ValueError, neg.NegotiationError) as exc:
            log.warning("unreadable configuration from the box: %s", exc)
            return
        if not isinstance(config, neg.Config):
            return
        self._config_seen = True
        self.stats["configs"] += 1
        if config.control_port != self.control_port:
            self.control_port = config.control_port
        if self.on_config is not None:
            self.on_config(config)

    async def _ask_config(self) -> None:
        """Datagrams get lost: without a configuration soon after connecting, ask (and again)."""
        delay = self.ask_after
        while True:
            await self._connected.wait()
            await asyncio.sleep(delay)
            if self._config_seen:
                return
            self.driver.send_frame(self.box_key, wire.Control(neg.CONFIG_CHANNEL, b""))
            delay = min(RECONNECT_MAX, delay * 2)

    # --- the control socket -----------------------------------------------------------------

    async def _socket(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        delay = RECONNECT_FIRST
        while True:
            await self._connected.wait()
            if not self.control_port:
                return  # the box has no control socket: we stay where the tunnel puts us
            try:
                sock = None
                if self.dialer is not None:
                    async with asyncio.timeout(OPEN_TIMEOUT):
                        sock = await self.dialer(self.box_address, self.control_port)
                async with connect(
                    self.url,
                    sock=sock,
                    open_timeout=OPEN_TIMEOUT,
                    # No keepalive pings: every packet in the tunnel keeps the session "active"
                    # (1 s heartbeats, docs/paths.md) and a ping every 20 s would keep it so
                    # forever. The socket closes when the session does (below) instead.
                    ping_interval=None,
                    ping_timeout=None,
                    close_timeout=2,
                    max_size=neg.MAX_MESSAGE,
                    compression=None,
                    proxy=None,
                ) as ws:
                    self.stats["connects"] += 1
                    self.socket_open, self.last_error = True, ""
                    delay = RECONNECT_FIRST
                    log.info("control socket open: %s", self.url)
                    await self._serve(ws)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, WebSocketException) as exc:
                self.stats["errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("control socket: %s; again in %.0f s", self.last_error, delay)
            finally:
                self.socket_open = False
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX, delay * 2)

    async def _serve(self, ws: Any) -> None:
        self._sent = None  # a new socket: the box hears our candidates again
        self._dirty.set()
        loop = asyncio.get_running_loop()
        sender = loop.create_task(self._send_loop(ws))
        closer = loop.create_task(self._close_when_disconnected(ws))
        try:
            async for raw in ws:
                self._message(raw)
        finally:
            for task in (sender, closer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _close_when_disconnected(self, ws: Any) -> None:
        """The tunnel's session ended (the box is gone for 90 s): so does this socket."""
        await self._disconnected.wait()
        await ws.close()

    async def _send_loop(self, ws: Any) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            candidates = self.driver.peer.local_candidates()
            body = neg.candidates_to_json(candidates)
            changed, self._network_changed = self._network_changed, False
            if changed or body != self._sent:
                await ws.send(
                    json.dumps(neg.hello(candidates, network_changed=changed, version=self.version))
                )
                self._sent = body
                self.stats["hellos"] += 1
            if self._netcheck is not None:
                report, self._netcheck = self._netcheck, None
                await ws.send(json.dumps({"type": "netcheck", "report": report}))

    def _message(self, raw: str | bytes) -> None:
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and data.get("type") == "error":
                log.warning("the box refused a control message: %s", data.get("error"))
                return
            message = neg.parse_box_message(data)
        except (ValueError, neg.NegotiationError) as exc:
            log.warning("unreadable control message: %s", exc)
            return
        if isinstance(message, neg.Punch):
            self.stats["punches"] += 1
            self.driver.set_remote_candidates(self.box_key, message.candidates)
            self.driver.schedule_start(self.box_key, message.delay)
            log.info(
                "simultaneous start in %.0f ms (attempt %d, %d candidates)",
                message.delay * 1000,
                message.attempt,
                len(message.candidates),
            )
