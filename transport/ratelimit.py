"""Token buckets with the time passed in.

Library rate limiters read the clock themselves, which the sans-IO rule forbids (the protocol
cores take ``now`` as an argument so tests can run on a fake clock); these two small classes
are the project's only rate limiters.
"""

from __future__ import annotations

from collections.abc import Hashable


class TokenBucket:
    """One bucket: ``rate`` tokens a second, at most ``burst``. Kept tiny: the relay holds two
    per peer and takes from them on every forwarded packet."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class KeyedBuckets:
    """A bucket per key (a source address, a /64), bounded in number.

    When the table is full, buckets that have refilled are forgotten (they hold nothing a fresh
    bucket would not); if none has, a new key is refused. Refusing is the point: under a spray
    of (possibly spoofed) sources, evicting old entries instead would hand every new source a
    full bucket and the limit would limit nothing.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be positive, burst at least 1 and max_keys at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    def allow(self, key: Hashable, now: float) -> bool:
        entry = self._buckets.get(key)
        if entry is None:
            if len(self._buckets) >= self.max_keys:
                self.prune(now)
                if len(self._buckets) >= self.max_keys:
                    return False
            tokens = self.burst
        else:
            tokens, last = entry
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def prune(self, now: float) -> None:
        full = [
            key
            for key, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
