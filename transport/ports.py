"""A service's port policy: which TCP and UDP ports it exposes to approved devices.

The console form takes two specs of the same syntax, what to allow and what to exclude::

    spec    = "all" | clause *( ";" clause )          ; "all" = every TCP and UDP port
    clause  = proto item *( ( "," | whitespace ) item )
    proto   = "tcp" | "udp"                           ; case-insensitive
    item    = "all" | port | port "-" port            ; "all" = 1-65535
    port    = 1*5DIGIT                                ; 1 … 65535

e.g. allow ``tcp 22, 80, 8000-8100; udp 53`` and exclude ``tcp 8050``. Written on one line (in
logs, on the command line, as ``str(policy)``) the two specs are joined by ``except``:
``tcp 22, 80, 8000-8100; udp 53 except tcp 8050``.

The parser is strict on purpose: overlapping or repeated items, reversed ranges, exclusions outside
what is allowed and exclusions that leave nothing open are errors, because each is most likely a
typo the owner should see rather than have silently "fixed". Empty clauses (a trailing ``;``) are
tolerated.

:meth:`PortPolicy.effective_ranges` gives what the forwarding layer programs: allowed minus
excluded, merged and sorted. ``str(policy)``, :attr:`~PortPolicy.allow_text` and
:attr:`~PortPolicy.exclude_text` are canonical forms that parse back to an equal policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PROTOCOLS = ("tcp", "udp")
MIN_PORT = 1  # port 0 is "any port" to the sockets API, never a real destination
MAX_PORT = 65535
ALL = (MIN_PORT, MAX_PORT)

# An inclusive (first, last) port range.
Range = tuple[int, int]

# [0-9] rather than \d: \d also matches other scripts' digits, which int() would accept.
_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?")
# Spaces around a hyphen between two numbers, so "8000 - 8100" means "8000-8100".
_SPACED_HYPHEN = re.compile(r"(?<=[0-9])\s*-\s*(?=[0-9])")
_SEPARATORS = re.compile(r"[\s,]+")
_NOTHING_ALLOWED = "no ports are allowed: choose ports or 'all'"
_EXCEPT = re.compile(r"\bexcept\b", re.IGNORECASE)


class PortPolicyError(ValueError):
    """A port spec the owner must fix; the message says what and where."""


def _format_range(proto: str, r: Range) -> str:
    return f"{proto} {_format_item(r)}"


def _format_item(r: Range) -> str:
    if r == ALL:
        return "all"
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _merge(ranges: Iterable[Range]) -> list[Range]:
    """Sort ranges and join those that overlap or touch: [(80, 80), (81, 90)] -> [(80, 90)]."""
    merged: list[Range] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _subtract(ranges: Sequence[Range], holes: Sequence[Range]) -> list[Range]:
    """``ranges`` minus ``holes``, both given as merged lists; the result is merged too."""
    result: list[Range] = []
    for first, last in ranges:
        start = first
        for h_first, h_last in holes:
            if h_last < start or h_first > last:
                continue
            if h_first > start:
                result.append((start, h_first - 1))
            start = h_last + 1
        if start <= last:
            result.append((start, last))
    return result


def _check_ranges(proto: str, ranges: Sequence[Range]) -> None:
    """Raise unless every range is valid and no two share a port."""
    for first, last in ranges:
        for port in (first, last):
            if not MIN_PORT <= port <= MAX_PORT:
                raise PortPolicyError(f"{port} is out of range: ports are 1-65535")
        if first > last:
            raise PortPolicyError(f"{first}-{last}: the range is reversed")
    widest: Range | None = None  # the range seen so far that reaches furthest right
    for r in sorted(ranges):
        if widest is not None and r[0] <= widest[1]:
            if r == widest:
                raise PortPolicyError(f"{_format_range(proto, r)} is listed twice")
            raise PortPolicyError(
                f"{_format_range(proto, widest)} overlaps {_format_range(proto, r)}"
            )
        if widest is None or r[1] > widest[1]:
            widest = r


def _check_exclusions(proto: str, allowed: Sequence[Range], excluded: Sequence[Range]) -> None:
    """Raise unless every excluded range lies inside the allowed ones."""
    open_ranges = _merge(allowed)
    for r in excluded:
        outside = _subtract([r], open_ranges)
        if not outside:
            continue  # entirely allowed
        if outside == [r]:
            raise PortPolicyError(f"{_format_range(proto, r)} is excluded but not allowed")
        raise PortPolicyError(f"{_format_range(proto, r)} is excluded but only partly allowed")


@dataclass(frozen=True)
class PortPolicy:
    """Allowed and excluded port ranges per protocol; validated and sorted on construction.

    Build it with :meth:`parse` from the console's text. Constructing it directly runs the same
    checks, so an invalid policy cannot exist.
    """

    allow_tcp: tuple[Range, ...] = ()
    allow_udp: tuple[Range, ...] = ()
    exclude_tcp: tuple[Range, ...] = ()
    exclude_udp: tuple[Range, ...] = ()

    def __post_init__(self) -> None:
        # Sort so that equal policies compare equal whatever order their items were written in.
        for field in ("allow_tcp", "allow_udp", "exclude_tcp", "exclude_udp"):
            object.__setattr__(self, field, tuple(sorted(getattr(self, field))))
        if not self.allow_tcp and not self.allow_udp:
            raise PortPolicyError(_NOTHING_ALLOWED)
        for proto in PROTOCOLS:
            _check_ranges(proto, self._allowed(proto))
            _check_ranges(proto, self._excluded(proto))
            _check_exclusions(proto, self._allowed(proto), self._excluded(proto))
        if not any(self.effective_ranges(proto) for proto in PROTOCOLS):
            raise PortPolicyError("the exclusions leave no port open")

    @classmethod
    def parse(cls, allow: str, exclude: str = "") -> PortPolicy:
        """Parse the console's two specs, e.g. ``parse("tcp all; udp 53", "tcp 8050")``.

        ``allow`` may also be the one-line form ``"tcp all; udp 53 except tcp 8050"``.
        """
        one_line = _EXCEPT.split(allow, maxsplit=1)
        if len(one_line) == 2:
            if exclude.strip():
                raise PortPolicyError("give exclusions after 'except' or separately, not both")
            allow, exclude = one_line
        allowed = _parse_spec(allow)
        if not any(allowed.values()):
            raise PortPolicyError(_NOTHING_ALLOWED)
        excluded = _parse_spec(exclude)
        return cls(
            allow_tcp=tuple(allowed["tcp"]),
            allow_udp=tuple(allowed["udp"]),
            exclude_tcp=tuple(excluded["tcp"]),
            exclude_udp=tuple(excluded["udp"]),
        )

    def _allowed(self, proto: str) -> tuple[Range, ...]:
        return self.allow_tcp if proto == "tcp" else self.allow_udp

    def _excluded(self, proto: str) -> tuple[Range, ...]:
        return self.exclude_tcp if proto == "tcp" else self.exclude_udp

    def effective_ranges(self, proto: str) -> list[Range]:
        """The open ports of ``proto`` ("tcp"/"udp", any case): allowed minus excluded, merged."""
        proto = _protocol(proto)
        return _subtract(_merge(self._allowed(proto)), _merge(self._excluded(proto)))

    def allows(self, proto: str, port: int) -> bool:
        """True when a connection to ``port`` over ``proto`` is let through."""
        return any(first <= port <= last for first, last in self.effective_ranges(proto))

    @property
    def allow_text(self) -> str:
        """The allowed ports in canonical syntax, e.g. ``tcp 22, 80; udp 53`` or ``all``."""
        return _format_spec(self.allow_tcp, self.allow_udp)

    @property
    def exclude_text(self) -> str:
        """The excluded ports in canonical syntax; "" when nothing is excluded."""
        return _format_spec(self.exclude_tcp, self.exclude_udp)

    def __str__(self) -> str:
        if not self.exclude_text:
            return self.allow_text
        return f"{self.allow_text} except {self.exclude_text}"


def _protocol(token: str) -> str:
    proto = token.lower()
    if proto not in PROTOCOLS:
        raise PortPolicyError(f"{token!r} is not a protocol: use tcp or udp")
    return proto


def _parse_item(token: str) -> Range:
    if token.lower() == "all":
        return ALL
    match = _ITEM.fullmatch(token)
    if match is None:
        what = "port range" if "-" in token else "port number"
        raise PortPolicyError(f"{token!r} is not a {what}")
    first_digits, last_digits = match.group(1), match.group(2) or match.group(1)
    ports = []
    for digits in (first_digits, last_digits):
        # Checking the length first keeps int() away from absurdly long digit strings, which
        # Python refuses (ValueError) past 4300 digits.
        port = int(digits) if len(digits) <= 5 else MAX_PORT + 1
        if not MIN_PORT <= port <= MAX_PORT:
            raise PortPolicyError(f"{digits.lstrip('0') or '0'} is out of range: ports are 1-65535")
        ports.append(port)
    first, last = ports
    if first > last:
        raise PortPolicyError(f"{first}-{last}: the range is reversed")
    return first, last


def _parse_spec(text: str) -> dict[str, list[Range]]:
    """Parse one spec into ranges per protocol, unsorted and unchecked for overlaps."""
    ranges: dict[str, list[Range]] = {proto: [] for proto in PROTOCOLS}
    text = _SPACED_HYPHEN.sub("-", text)
    for clause in text.split(";"):
        tokens = [t for t in _SEPARATORS.split(clause) if t]
        if not tokens:
            continue
        head = tokens[0]
        if head.lower() == "all":
            if len(tokens) > 1:
                raise PortPolicyError("'all' stands alone; did you mean 'tcp all' or 'udp all'?")
            for proto in PROTOCOLS:
                ranges[proto].append(ALL)
            continue
        if _ITEM.fullmatch(head):
            raise PortPolicyError(f"{head!r} needs a protocol: write 'tcp {head}' or 'udp {head}'")
        # A protocol name starts its own list, so 'tcp 22, udp 53' reads as people write it.
        proto, listed = _protocol(head), 0
        for token in tokens[1:]:
            if token.lower() in PROTOCOLS:
                if not listed:
                    raise PortPolicyError(f"{proto}: list ports or 'all'")
                proto, listed = token.lower(), 0
                continue
            ranges[proto].append(_parse_item(token))
            listed += 1
        if not listed:
            raise PortPolicyError(f"{proto}: list ports or 'all'")
    return ranges


def _format_spec(tcp: Sequence[Range], udp: Sequence[Range]) -> str:
    if list(tcp) == [ALL] and list(udp) == [ALL]:
        return "all"
    clauses = [
        f"{proto} " + ", ".join(_format_item(r) for r in ranges)
        for proto, ranges in (("tcp", tcp), ("udp", udp))
        if ranges
    ]
    return "; ".join(clauses)
