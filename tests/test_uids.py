"""UID pool: unique while live, next-fit reuse, exhaustion detected exactly."""


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.uids import MAX_SIZE, UidPool


def test_hands_out_1_upwards_and_never_0():
    pool = UidPool()
    assert [pool.allocate() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert 0 not in pool
    assert pool.in_use == len(pool) == 5
    assert all(uid in pool for uid in range(1, 6))
    assert 6 not in pool


def test_freed_uid_comes_back_only_after_the_others():
    pool = UidPool(size=5)
    assert [pool.allocate() for _ in range(3)] == [1, 2, 3]
    pool.release(2)
    assert 2 not in pool
    # Next-fit: the cursor goes on to 4 and 5 before wrapping round to the freed 2.
    assert [pool.allocate() for _ in range(3)] == [4, 5, 2]
    assert pool.allocate() is None
    pool.release(4)
    pool.release(1)
    # After the wrap the cursor stands after 2: 4 is found before 1.
    assert [pool.allocate(), pool.allocate()] == [4, 1]


def test_cursor_skips_live_uids_and_wraps():
    pool = UidPool(size=6)
    for _ in range(6):
        pool.allocate()
    for uid in (5, 2):
        pool.release(uid)
    assert pool.allocate() == 2  # cursor was past 6, wraps to 1 (live), finds 2
    assert pool.allocate() == 5
    assert pool.allocate() is None


def test_exhaustion_of_a_small_pool_and_recovery():
    pool = UidPool(size=3)
    assert {pool.allocate() for _ in range(3)} == {1, 2, 3}
    assert pool.allocate() is None
    assert pool.available == 0
    pool.release(3)
    assert pool.allocate() == 3
    assert pool.allocate() is None


def test_the_real_pool_holds_exactly_65535():
    pool = UidPool()
    uids = [pool.allocate() for _ in range(MAX_SIZE)]
    assert uids == list(range(1, 0x10000))
    assert pool.allocate() is None
    assert pool.in_use == 65535
    # A nearly full pool still finds its one free UID at once, wherever it is.
    pool.release(0x1234)
    assert pool.allocate() == 0x1234
    pool.release(0xFFFF)
    assert pool.allocate() == 0xFFFF
    assert pool.allocate() is None


def test_block_boundaries():
    # 256 and 511 sit at the edges of the bitmap's 256-bit blocks.
    pool = UidPool(size=600)
    for _ in range(600):
        pool.allocate()
    for uid in (255, 256, 511, 512, 600):
        pool.release(uid)
    assert [pool.allocate() for _ in range(5)] == [255, 256, 511, 512, 600]
    assert pool.allocate() is None


@pytest.mark.parametrize("size", [1, 255, 256, 257])
def test_odd_sizes(size):
    pool = UidPool(size=size)
    assert [pool.allocate() for _ in range(size)] == list(range(1, size + 1))
    assert pool.allocate() is None


def test_release_of_a_free_uid_is_an_error():
    pool = UidPool(size=4)
    uid = pool.allocate()
    pool.release(uid)
    with pytest.raises(ValueError):
        pool.release(uid)
    for bad in (0, 5, -1, 0x10000):
        with pytest.raises(ValueError):
            pool.release(bad)
    assert "1" not in pool


def test_size_is_checked():
    for bad in (0, -1, 0x10000):
        with pytest.raises(ValueError):
            UidPool(size=bad)


class _NextFitModel:
    """The rule written the slow, obvious way: scan forward from the cursor, wrapping."""

    def __init__(self, size):
        self.size, self.live, self.cursor = size, set(), 1

    def allocate(self):
        if len(self.live) == self.size:
            return None
        uid = self.cursor
        while uid in self.live:
            uid = uid + 1 if uid < self.size else 1
        self.live.add(uid)
        self.cursor = uid + 1 if uid < self.size else 1
        return uid


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([1, 2, 7, 255, 256, 300, 600]),
    steps=st.lists(st.one_of(st.none(), st.integers(0, 10_000)), max_size=200),
)
def test_churn_matches_the_next_fit_model(size, steps):
    pool, model = UidPool(size=size), _NextFitModel(size)
    for step in steps:
        if step is None or not model.live:
            assert pool.allocate() == model.allocate()
        else:
            uid = sorted(model.live)[step % len(model.live)]
            pool.release(uid)
            model.live.discard(uid)
        assert pool.in_use == len(model.live)
        assert all((uid in pool) == (uid in model.live) for uid in range(0, size + 2))
