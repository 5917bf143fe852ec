"""The negotiation on the box: pair a device's candidates with the box's, start both sides at
once, and try again with backoff until the device is direct (``docs/negotiation.md``).

Who does what::

    device --hello (candidates)--> DeviceControlConsumer --do_record_candidates--> cache
                                                          --negotiate.delay-->  Celery
    transportd --publish_box_candidates--> cache (the box's own candidates, its port mapping)
    Celery negotiate: do_negotiate()  --punch.start--> transportd  (channel layer)
                                      --punch.start--> the device's control socket
    Celery check_negotiation (a few seconds later): direct? done. Else negotiate again after
        5, 10, 20 … 300 s. A new hello (network changed, new candidates) starts over at once.

The state is in the cache (Redis), not the database: it is short-lived and rebuilt by the next
hello. Each hello bumps a *generation*; a task from an older generation does nothing.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

from django.core.cache import cache

from lazycat.core.live import send_to_device, send_to_transportd
from lazycat.core.models import BoxNetcheck
from lazycat.devices.models import Device, DeviceStatus, PathKind
from transport import negotiation as neg
from transport.paths import Candidate

log = logging.getLogger(__name__)

BOX_CANDIDATES_KEY = "negotiation:box"
STATE_TTL = 3600  # seconds a device's candidates are kept without a new hello
BOX_TTL = 900  # transportd republishes well within this
CHECK_AFTER = 4.0  # seconds after the start: a probe round has succeeded or failed by then
DIRECT = {PathKind.LAN, PathKind.DIRECT_V6, PathKind.DIRECT_V4, PathKind.DIRECT_PORTMAPPED}


def _state_key(device_id: int) -> str:
    return f"negotiation:device:{device_id}"


# --- the box's side (written by transportd) ------------------------------------------------------


def publish_box_candidates(candidates: list[Candidate], port_mapping: str = "") -> None:
    """transportd's candidates (local, reflexive, port mapping, relays) for the negotiation."""
    cache.set(
        BOX_CANDIDATES_KEY,
        {"candidates": neg.candidates_to_json(candidates), "port_mapping": port_mapping},
        timeout=BOX_TTL,
    )


def box_candidates() -> tuple[list[Candidate], str]:
    """The box's candidates as transportd last published them, and its port mapping."""
    data = cache.get(BOX_CANDIDATES_KEY)
    if not isinstance(data, dict):
        return [], ""
    try:
        return neg.candidates_from_json(data.get("candidates")), str(data.get("port_mapping", ""))
    except neg.NegotiationError:
        log.warning("box candidates in the cache are unreadable; waiting for transportd")
        return [], ""


# --- the device's side ------------------------------------------------------------------------


def do_record_candidates(device: Device, hello: neg.Hello) -> int | None:
    """A device's candidates (from its control socket). Returns the new generation, or None
    when there is nothing to negotiate: the device is direct already and says nothing new (a
    control socket that reopened after the web process restarted)."""
    state = cache.get(_state_key(device.pk)) or {}
    candidates = neg.candidates_to_json(hello.candidates)
    if (
        device.path in DIRECT
        and not hello.network_changed
        and state.get("candidates") == candidates
    ):
        return None
    generation = int(state.get("generation", 0)) + 1
    cache.set(
        _state_key(device.pk),
        {
            "candidates": candidates,
            "generation": generation,
            "attempt": 0,
        },
        timeout=STATE_TTL,
    )
    log.info(
        "device candidates",
        extra={
            "device": device.pk,
            "generation": generation,
            "candidates": len(hello.candidates),
            "network_changed": hello.network_changed,
        },
    )
    return generation


def _latencies(relays: object) -> dict[str, float]:
    """``[{"name": ..., "rtt_ms": ...}]`` (a netcheck report's relays) as name -> seconds."""
    out: dict[str, float] = {}
    if isinstance(relays, list):
        for item in relays:
            if isinstance(item, dict):
                name, rtt = item.get("name"), item.get("rtt_ms")
                if isinstance(name, str) and isinstance(rtt, int | float) and rtt >= 0:
                    out[name] = float(rtt) / 1000
    return out


@dataclass(frozen=True)
class Started:
    plan: neg.Plan
    attempt: int


def do_negotiate(device_id: int, generation: int) -> Started | None:
    """Pair the candidates and send the simultaneous start to both sides. None when there is
    nothing to do: the device is gone or not approved, a newer hello superseded this one, or
    the box has not published its candidates yet."""
    device = Device.objects.filter(pk=device_id, status=DeviceStatus.APPROVED).first()
    state = cache.get(_state_key(device_id))
    if device is None or not isinstance(state, dict) or state.get("generation") != generation:
        return None
    box, _ = box_candidates()
    if not box:
        log.warning("no box candidates yet: is transportd running?", extra={"device": device_id})
        return None
    try:
        theirs = neg.candidates_from_json(state.get("candidates"))
    except neg.NegotiationError:
        return None
    check = BoxNetcheck.objects.latest_run()
    box_latency = _latencies(check.relay_latencies) if check is not None else {}
    device_latency = _latencies((device.netcheck or {}).get("relays"))
    plan = neg.plan(box, theirs, box_latency=box_latency, device_latency=device_latency)
    attempt = int(state.get("attempt", 0)) + 1
    cache.set(_state_key(device_id), state | {"attempt": attempt}, timeout=STATE_TTL)
    send_to_transportd(
        {
            "type": "punch.start",
            "public_key": base64.b64encode(device.key).decode(),
            "candidates": neg.candidates_to_json(plan.to_box),
            "delay": plan.box_delay,
        }
    )
    punch = neg.Punch(plan.to_device, plan.device_delay, plan.relay, attempt)
    send_to_device(device_id, {"type": "control.send", "message": neg.punch_message(punch)})
    log.info(
        "simultaneous start",
        extra={
            "device": device_id,
            "attempt": attempt,
            "relay": plan.relay or "-",
            "box_delay_ms": round(plan.box_delay * 1000),
            "to_device": len(plan.to_device),
            "to_box": len(plan.to_box),
        },
    )
    return Started(plan, attempt)


def do_check_negotiation(device_id: int, generation: int) -> float | None:
    """After a start: seconds until the next attempt, or None (direct, gone or superseded)."""
    state = cache.get(_state_key(device_id))
    if not isinstance(state, dict) or state.get("generation") != generation:
        return None
    device = Device.objects.filter(pk=device_id, status=DeviceStatus.APPROVED).first()
    if device is None or device.path == PathKind.OFFLINE:
        return None
    if device.path in DIRECT:
        cache.set(_state_key(device_id), state | {"attempt": 0}, timeout=STATE_TTL)
        return None
    return neg.retry_delay(int(state.get("attempt", 1)))
