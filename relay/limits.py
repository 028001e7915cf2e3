"""Abuse limits, decided without I/O: counters and token buckets, the time passed in.

A public relay is shared by strangers, so no single source may take it over: each limit
here refuses one kind of excess, and only the connection that exceeds it. The driver asks
before it serves (``Guard.admit`` for a new connection, ``Guard.hello`` for each Hello,
``Guard.open_room`` for a room), tells the guard when things end, and carries out the
refusal in the protocol's terms (a Timeout ``0f`` on the handshake port, ``01`` on the
secure port, HTTP 503 on the WebSocket port). The relay core asks ``Guard.start_handshake``
before it forwards a receiver's first handshake packet to a sender, and says how each
handshake ended (``Guard.end_handshake``): see ``Failures`` for why.

A *source* is an IPv4 address, or the /64 network of an IPv6 address: one IPv6 host
usually holds a whole /64, so counting its single addresses would limit nothing.
Addresses in ``Limits.exempt`` (by default the relay's own host, e.g. a local reverse
proxy) are not counted per source; the total and the rooms limits still apply to them.

Every limit is off when set to 0.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import logging
import math
from typing import Iterable, Union

import attrs

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

IPV6_SOURCE_PREFIX = 64
"""Bits of an IPv6 address that name one source."""
ROOM_BURST_SECONDS = 0.25
"""A rate-limited room may move this many seconds' worth of bytes at once."""
MIN_ROOM_BURST = 64 * 1024
"""...but at least this many bytes, so that a slow rate still moves whole buffers."""


class Refusal(enum.StrEnum):
    """Which limit refused; also the label of the refusals metric."""

    CONNECTIONS = "connections"
    CONNECTIONS_PER_ADDRESS = "connections_per_address"
    HELLO_RATE = "hello_rate"
    ROOMS = "rooms"
    FAILED_HANDSHAKES_PER_ADDRESS = "failed_handshakes_per_address"
    FAILED_HANDSHAKES_PER_SENDER = "failed_handshakes_per_sender"
    SENDERS_PER_NAMEPLATE = "senders_per_nameplate"

    def describe(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Refusal.CONNECTIONS: "too many connections to the relay",
    Refusal.CONNECTIONS_PER_ADDRESS: "too many connections from this address",
    Refusal.HELLO_RATE: "too many Hellos from this address",
    Refusal.ROOMS: "too many open rooms",
    Refusal.FAILED_HANDSHAKES_PER_ADDRESS: "too many failed handshakes from this address",
    Refusal.FAILED_HANDSHAKES_PER_SENDER: "too many failed handshakes with this sender",
    Refusal.SENDERS_PER_NAMEPLATE: "too many senders waiting with this nameplate",
}


@attrs.define
class RefusalLog:
    """One log line per limit per ``every`` seconds at most, saying how many were left out,
    so that a flood of refusals cannot flood the log."""

    logger: logging.Logger
    every: float = 1.0
    last: dict[Refusal, float] = attrs.Factory(dict)
    unsaid: collections.Counter = attrs.Factory(collections.Counter)

    def refused(self, refusal: Refusal, what: str, now: float) -> None:
        if now - self.last.get(refusal, -math.inf) < self.every:
            self.unsaid[refusal] += 1
            return
        more = self.unsaid.pop(refusal, 0)
        self.logger.info("refused %s: %s%s", what, refusal.describe(),
                         f" (and {more} more since the last such line)" if more else "")
        self.last[refusal] = now


def _networks(values: Iterable[str | Network]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) if isinstance(v, str) else v
                 for v in values)


def _at_least_zero(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{attribute.name} must be 0 or more, not {value!r}")


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{attribute.name} must be more than 0, not {value!r}")


DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")


@attrs.frozen
class Limits:
    """The limits in force; 0 turns one off."""

    max_connections: int = attrs.field(default=10_000, validator=_at_least_zero)
    """Open connections on all ports together (each costs a descriptor or two)."""
    max_connections_per_address: int = attrs.field(default=64, validator=_at_least_zero)
    """Open connections from one source, on all ports together."""
    hello_rate: float = attrs.field(default=2.0, validator=_at_least_zero)
    """Hellos per second one source may send, sustained."""
    hello_burst: int = attrs.field(default=20, validator=_at_least_zero)
    """Hellos one source may send at once before ``hello_rate`` applies."""
    max_rooms: int = attrs.field(default=1000, validator=_at_least_zero)
    """Open secure rooms (pipes carrying a transfer)."""
    room_rate: int = attrs.field(default=0, validator=_at_least_zero)
    """Bytes per second one room may carry, both directions together (0: unlimited)."""
    exempt: tuple[Network, ...] = attrs.field(default=DEFAULT_EXEMPT, converter=_networks)
    """Addresses not counted per source."""
    max_failed_handshakes_per_address: int = attrs.field(default=5, validator=_at_least_zero)
    """Handshakes from one source that may end without an agreement per window (open ones
    count too); past it, the source's new handshakes are refused until old failures age out."""
    max_failed_handshakes_per_sender: int = attrs.field(default=20, validator=_at_least_zero)
    """The same for one sender, from every source together. Our senders give up after 3 by
    themselves; this caps the guesses at a bob sender, which has no limit of its own. It is
    high because strangers who reach it block the sender's own receiver for a window."""
    failed_handshake_window: float = attrs.field(default=600.0, validator=_positive)
    """Seconds a failed handshake counts against its source and its sender."""
    max_senders_per_nameplate: int = attrs.field(default=64, validator=_at_least_zero)
    """Senders that may wait with one nameplate (the first two bytes of their salt), so
    that flooding a nameplate cannot slow its receivers; bob's random salts spread over
    65,536 nameplates, so honest senders never meet it."""


def source_of(host: str, exempt: Iterable[Network] = ()) -> str | None:
    """The source an address belongs to, or None if it is exempt (or not an IP address)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in exempt):
        return None
    if address.version == 6:
        return str(ipaddress.ip_network((address, IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


def host_of(identity: bytes) -> str:
    """The address part of an identity (``1.2.3.4:5`` or ``[v6]:5``)."""
    text = identity.decode("ascii", "replace")
    host = text.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@attrs.define
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` if there is that much; say whether it was spent."""
        self.refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

    def available(self, now: float) -> float:
        self.refill(now)
        return self.tokens

    def spend(self, amount: float) -> None:
        """Spend what was already used (may go below zero: later waits pay it back)."""
        self.tokens -= amount

    def wait(self, now: float, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens are there."""
        self.refill(now)
        missing = min(amount, self.burst) - self.tokens
        return max(0.0, missing / self.rate) if self.rate > 0 else float("inf")

    def is_full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


@attrs.define(eq=False)
class Failures:
    """Failed handshakes of one source or one sender in the window, and handshakes open.

    Each handshake a receiver runs with a sender gives it one offline guess of the code (the
    sender's 06), and costs our sender one of its few attempts unless it ends in an
    agreement. Someone without the code can run them with every waiting sender, from fresh
    connections, so the relay counts them where one person cannot multiply them: per source
    and per sender. Open handshakes count as failed until they end, or one could open many
    at once and fail them all together. ``times`` holds no more than the limit allows (a
    handshake is refused once the count reaches it), so memory stays small.
    """

    times: collections.deque = attrs.Factory(collections.deque)
    open: int = 0

    def recent(self, now: float, window: float) -> int:
        """Failures within ``window`` seconds before ``now`` (older ones are forgotten)."""
        while self.times and self.times[0] <= now - window:
            self.times.popleft()
        return len(self.times)


@attrs.define(eq=False)
class Attempt:
    """A handshake the guard let start; end it once with ``Guard.end_handshake``."""

    source: str | None
    """The source counted, None if exempt."""
    sender: Failures
    ended: bool = False


@attrs.define(eq=False)
class Admission:
    """A connection the guard let in; give it back with ``Guard.release``."""

    source: str | None
    """The source it is counted against, None if none (exempt)."""
    holders: int = 1
    """Tasks that each release it once; the connection counts until the last one does."""
    released: bool = False


class RoomMeter:
    """What one room carried so far, and its rate limit (shared by both directions)."""

    def __init__(self, rate: int = 0, now: float = 0.0) -> None:
        self.delivered = 0
        """Bytes delivered, both directions together: read live by the metrics."""
        self.bucket: TokenBucket | None = None
        self._chunk = 0
        if rate > 0:
            self.bucket = TokenBucket.full(rate, max(rate * ROOM_BURST_SECONDS, MIN_ROOM_BURST), now)
            # Read in useful amounts, not a few bytes each time a token trickles in.
            self._chunk = min(self.bucket.burst, MIN_ROOM_BURST) / 4

    def allowance(self, now: float) -> int | None:
        """Bytes the room may read now: None for no limit, 0 for none yet (see ``wait``)."""
        if self.bucket is None:
            return None
        available = self.bucket.available(now)
        return int(available) if available >= self._chunk else 0

    def spend(self, amount: int) -> None:
        if self.bucket is not None:
            self.bucket.spend(amount)

    def wait(self, now: float) -> float:
        """Seconds until ``allowance`` is not 0 again."""
        if self.bucket is None:
            return 0.0
        return self.bucket.wait(now, self._chunk)


class Guard:
    """The relay's limits and what counts against them."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self.connections = 0
        self.rooms = 0
        self.refused: collections.Counter[Refusal] = collections.Counter()
        """Refusals so far, by limit: for the metrics."""
        self._per_source: collections.Counter[str] = collections.Counter()
        self._hellos: dict[str, TokenBucket] = {}
        self._prune_at = 1024
        self._guessing: dict[str, Failures] = {}
        self._guessing_prune_at = 1024

    def source(self, host: str) -> str | None:
        return source_of(host, self.limits.exempt)

    @property
    def sources(self) -> int:
        """Sources with open connections (counted per source)."""
        return len(self._per_source)

    def admit(self, host: str, *, per_source: bool = True) -> Admission | Refusal:
        """A new connection from ``host``. ``per_source=False`` counts it in the total only
        (a trusted proxy's connection, counted later by ``charge`` for the client it names)."""
        limits = self.limits
        if limits.max_connections and self.connections >= limits.max_connections:
            return self._refuse(Refusal.CONNECTIONS)
        admission = Admission(None)
        if per_source:
            refusal = self.charge(admission, host)
            if refusal is not None:
                return refusal
        self.connections += 1
        return admission

    def charge(self, admission: Admission, host: str) -> Refusal | None:
        """Count ``admission`` against ``host``'s source too (once); None if allowed."""
        if admission.source is not None or admission.released:
            return None
        source = self.source(host)
        if source is None:
            return None
        limit = self.limits.max_connections_per_address
        if limit and self._per_source[source] >= limit:
            return self._refuse(Refusal.CONNECTIONS_PER_ADDRESS)
        self._per_source[source] += 1
        admission.source = source
        return None

    def share(self, admission: Admission) -> Admission:
        """One more task will ``release`` this admission (a connection changing hands)."""
        admission.holders += 1
        return admission

    def release(self, admission: Admission) -> None:
        """A holder is done with the connection; the last one frees its place."""
        if admission.released:
            return
        admission.holders -= 1
        if admission.holders > 0:
            return
        admission.released = True
        self.connections -= 1
        if admission.source is not None:
            self._per_source[admission.source] -= 1
            if not self._per_source[admission.source]:
                del self._per_source[admission.source]

    def hello(self, host: str, now: float) -> Refusal | None:
        """A Hello from ``host``: None if it may register, else the refusal."""
        limits = self.limits
        if not limits.hello_rate or not limits.hello_burst:
            return None
        source = self.source(host)
        if source is None:
            return None
        bucket = self._hellos.get(source)
        if bucket is None:
            self._prune(now)
            bucket = self._hellos[source] = TokenBucket.full(
                limits.hello_rate, limits.hello_burst, now)
        else:  # the limits may have been reloaded since
            bucket.rate, bucket.burst = limits.hello_rate, limits.hello_burst
        if bucket.take(now):
            return None
        return self._refuse(Refusal.HELLO_RATE)

    def open_room(self) -> Refusal | None:
        """A room is about to open: None if it may (then ``close_room`` when it ends)."""
        if self.limits.max_rooms and self.rooms >= self.limits.max_rooms:
            return self._refuse(Refusal.ROOMS)
        self.rooms += 1
        return None

    def close_room(self) -> None:
        self.rooms -= 1

    def room_meter(self, now: float) -> RoomMeter:
        return RoomMeter(self.limits.room_rate, now)

    @property
    def open_handshakes(self) -> int:
        """Handshakes let start and not ended yet, from sources counted per address."""
        return sum(counted.open for counted in self._guessing.values())

    @property
    def guessing_sources(self) -> int:
        """Sources with open handshakes or failed ones in the window (what memory holds)."""
        return len(self._guessing)

    def start_handshake(self, host: str, sender: Failures, now: float) -> Attempt | Refusal:
        """A receiver at ``host`` begins a handshake with the sender whose count is ``sender``:
        an ``Attempt`` if it may, else the refusal."""
        limits = self.limits
        window = limits.failed_handshake_window
        source = self.source(host)
        counted = self._guessing.get(source) if source is not None else None
        limit = limits.max_failed_handshakes_per_address
        if limit and counted is not None and counted.recent(now, window) + counted.open >= limit:
            return self._refuse(Refusal.FAILED_HANDSHAKES_PER_ADDRESS)
        limit = limits.max_failed_handshakes_per_sender
        if limit and sender.recent(now, window) + sender.open >= limit:
            return self._refuse(Refusal.FAILED_HANDSHAKES_PER_SENDER)
        if source is not None and counted is None:
            if len(self._guessing) >= self._guessing_prune_at:
                self.forget_failures(now)
            counted = self._guessing[source] = Failures()
        if counted is not None:
            counted.open += 1
        sender.open += 1
        return Attempt(source, sender)

    def end_handshake(self, attempt: Attempt, now: float, *, failed: bool) -> None:
        """The handshake ended: ``failed`` if without an agreement, by the receiver's doing."""
        if attempt.ended:
            return
        attempt.ended = True
        limits = self.limits
        attempt.sender.open -= 1
        if failed and limits.max_failed_handshakes_per_sender:
            attempt.sender.times.append(now)
        counted = self._guessing.get(attempt.source) if attempt.source is not None else None
        if counted is None:
            return
        counted.open -= 1
        if failed and limits.max_failed_handshakes_per_address:
            counted.times.append(now)
        if not counted.open and not counted.recent(now, limits.failed_handshake_window):
            del self._guessing[attempt.source]

    def senders_waiting(self, waiting: int) -> Refusal | None:
        """One more sender for a nameplate that has ``waiting``: None if it may wait."""
        cap = self.limits.max_senders_per_nameplate
        if cap and waiting >= cap:
            return self._refuse(Refusal.SENDERS_PER_NAMEPLATE)
        return None

    def forget_failures(self, now: float) -> None:
        """Forget sources with nothing open and no failure in the window: memory follows
        recent handshakes, not every address ever seen."""
        window = self.limits.failed_handshake_window
        for source in [s for s, counted in self._guessing.items()
                       if not counted.open and not counted.recent(now, window)]:
            del self._guessing[source]
        self._guessing_prune_at = max(1024, 2 * len(self._guessing))

    def _refuse(self, refusal: Refusal) -> Refusal:
        self.refused[refusal] += 1
        return refusal

    def _prune(self, now: float) -> None:
        """Forget sources whose bucket is full again (same as new), so that memory follows
        recent Hellos, not every address ever seen."""
        if len(self._hellos) < self._prune_at:
            return
        for source in [s for s, bucket in self._hellos.items() if bucket.is_full(now)]:
            del self._hellos[source]
        self._prune_at = max(1024, 2 * len(self._hellos))
