"""The handshake UIDs: 0001-ffff, never two live holders of one, reused as late as possible.

A UID is how peers address each other through the relay, so a departed peer's UID must not
be handed to a newcomer while ``Closed`` notices about the old holder are still in flight:
a packet meant for the old peer would reach the new one. Allocation is therefore next-fit:
a cursor moves forward, skips live UIDs and wraps, so a freed UID comes back only after the
cursor has gone round the whole space.

The free UIDs are kept as a two-level bitmap (blocks of 256 bits plus one bit per block
saying whether it has a free UID), so "the next free UID at or after the cursor" costs a
couple of integer operations however full the pool is; a plain scan would cost O(65535)
per Hello on a nearly full relay.
"""

from __future__ import annotations

_BLOCK_BITS = 256
_BLOCK_SHIFT = 8
_BLOCK_MASK = _BLOCK_BITS - 1
FIRST_UID = 0x0001
"""UID 0000 is the relay itself."""
MAX_SIZE = 0xFFFF


def _lowest_bit(value: int) -> int:
    """Index of the lowest set bit of a positive integer."""
    return (value & -value).bit_length() - 1


class UidPool:
    """UIDs ``1..size`` (``size`` is 65535 on the wire; tests use small pools to exhaust)."""

    def __init__(self, size: int = MAX_SIZE) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise ValueError(f"pool size must be 1-{MAX_SIZE}, not {size}")
        self.size = size
        blocks = (size >> _BLOCK_SHIFT) + 1
        # Bit i of _free[b] is set when UID b*256+i is free. UID 0 and UIDs above size are
        # never free, so every set bit is a UID we may hand out.
        full = (1 << _BLOCK_BITS) - 1
        self._free = [full] * blocks
        self._free[0] &= ~1
        self._free[-1] &= (1 << ((size & _BLOCK_MASK) + 1)) - 1
        self._blocks_with_free = (1 << blocks) - 1
        self._cursor = FIRST_UID
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def available(self) -> int:
        return self.size - self._in_use

    def __contains__(self, uid: object) -> bool:
        """Whether ``uid`` is held by a live peer."""
        if not isinstance(uid, int) or not FIRST_UID <= uid <= self.size:
            return False
        return not self._free[uid >> _BLOCK_SHIFT] >> (uid & _BLOCK_MASK) & 1

    def __len__(self) -> int:
        return self._in_use

    def allocate(self) -> int | None:
        """The next free UID at or after the cursor, or None when all are taken."""
        if self._in_use == self.size:
            return None
        uid = self._next_free(self._cursor)
        if uid is None:
            uid = self._next_free(FIRST_UID)
        assert uid is not None, "the in-use count says a UID is free"
        block = uid >> _BLOCK_SHIFT
        self._free[block] &= ~(1 << (uid & _BLOCK_MASK))
        if not self._free[block]:
            self._blocks_with_free &= ~(1 << block)
        self._in_use += 1
        self._cursor = uid + 1 if uid < self.size else FIRST_UID
        return uid

    def release(self, uid: int) -> None:
        """Give ``uid`` back; releasing a UID that is not live is a bug in the caller."""
        if uid not in self:
            raise ValueError(f"UID {uid!r} is not in use")
        block = uid >> _BLOCK_SHIFT
        self._free[block] |= 1 << (uid & _BLOCK_MASK)
        self._blocks_with_free |= 1 << block
        self._in_use -= 1

    def _next_free(self, start: int) -> int | None:
        """The lowest free UID >= start, without wrapping."""
        block = start >> _BLOCK_SHIFT
        here = self._free[block] >> (start & _BLOCK_MASK)
        if here:
            return start + _lowest_bit(here)
        later = self._blocks_with_free >> (block + 1)
        if not later:
            return None
        block += 1 + _lowest_bit(later)
        return (block << _BLOCK_SHIFT) + _lowest_bit(self._free[block])
