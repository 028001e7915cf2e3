"""Secure-room pairing: tickets, single use, leaving, expiry."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.rooms import Invalid, Paired, RoomBook, Waiting

CLIENT = b"127.0.0.1:40000"
SERVER = b"127.0.0.1:40001"


def booked(ttl=60.0, now=0.0):
    book = RoomBook(ttl=ttl)
    book.book(CLIENT, SERVER, now)
    return book


def test_receiver_first_then_sender():
    book = booked()
    # The receiver's ticket names the sender, and the other way round.
    assert book.arrive("recv", SERVER, 1.0) == Waiting()
    assert (book.pending, book.waiting) == (1, 1)
    assert book.arrive("send", CLIENT, 2.0) == Paired("recv")
    assert (book.pending, book.waiting) == (0, 0)
    assert book.next_deadline() is None


def test_sender_first_then_receiver():
    book = booked()
    assert book.arrive("send", CLIENT, 1.0) == Waiting()
    assert book.arrive("recv", SERVER, 1.0) == Paired("send")
    assert (book.pending, book.waiting) == (0, 0)


def test_unknown_ticket_is_invalid():
    book = booked()
    assert isinstance(book.arrive("x", b"10.0.0.1:1", 1.0), Invalid)
    assert isinstance(book.arrive("y", b"", 1.0), Invalid)
    assert (book.pending, book.waiting) == (1, 0)


def test_same_half_twice_is_invalid():
    book = booked()
    assert book.arrive("recv", SERVER, 1.0) == Waiting()
    second = book.arrive("impostor", SERVER, 1.0)
    assert isinstance(second, Invalid)
    assert "claimed" in second.reason
    # The genuine pair still works.
    assert book.arrive("send", CLIENT, 1.0) == Paired("recv")


def test_a_pair_is_used_once():
    book = booked()
    book.arrive("recv", SERVER, 1.0)
    book.arrive("send", CLIENT, 1.0)
    assert isinstance(book.arrive("recv2", SERVER, 1.0), Invalid)
    assert isinstance(book.arrive("send2", CLIENT, 1.0), Invalid)


def test_a_holder_cannot_send_two_tickets():
    book = booked()
    book.arrive("recv", SERVER, 1.0)
    with pytest.raises(ValueError):
        book.arrive("recv", CLIENT, 1.0)


def test_leave_kills_the_pair():
    book = booked()
    assert book.arrive("recv", SERVER, 1.0) == Waiting()
    book.leave("recv")
    assert (book.pending, book.waiting) == (0, 0)
    assert isinstance(book.arrive("send", CLIENT, 2.0), Invalid)
    book.leave("recv")  # twice, or unknown: harmless
    book.leave("never-seen")


def test_expiry_closes_waiting_halves_and_forgets_unclaimed_pairs():
    book = RoomBook(ttl=10.0)
    book.book(CLIENT, SERVER, 100.0)
    book.book(b"10.0.0.1:1", b"10.0.0.2:2", 105.0)
    assert book.next_deadline() == 110.0
    assert book.arrive("recv", SERVER, 101.0) == Waiting()
    assert book.expire(109.9) == []
    assert book.expire(110.0) == ["recv"]
    assert (book.pending, book.waiting) == (1, 0)
    assert book.next_deadline() == 115.0
    assert isinstance(book.arrive("send", CLIENT, 110.5), Invalid)
    assert book.expire(200.0) == []  # nobody ever came for the second pair
    assert (book.pending, book.waiting) == (0, 0)
    assert book.next_deadline() is None
    assert isinstance(book.arrive("late", b"10.0.0.2:2", 201.0), Invalid)


def test_expire_returns_both_orders_of_arrival():
    book = RoomBook(ttl=1.0)
    book.book(b"c1:1111", b"s1:1111", 0.0)
    book.book(b"c2:2222", b"s2:2222", 0.5)
    book.arrive("r1", b"s1:1111", 0.1)
    book.arrive("s2", b"c2:2222", 0.6)
    assert book.expire(5.0) == ["r1", "s2"]
    assert book.waiting == 0


def test_booking_without_a_clock_is_stamped_by_the_next_call():
    book = RoomBook(ttl=30.0)
    book.book(CLIENT, SERVER)  # the handshake core has no clock
    assert book.pending == 1
    assert book.next_deadline() == -math.inf  # "call expire now"
    assert book.expire(1000.0) == []
    assert book.next_deadline() == 1030.0
    book.book(b"c:12345", b"s:12345")
    assert book.arrive("r", b"s:12345", 1010.0) == Waiting()
    assert book.next_deadline() == 1030.0
    assert book.expire(1040.0) == ["r"]
    assert book.pending == 0


def test_newer_booking_takes_over_a_reused_ticket():
    book = RoomBook(ttl=100.0)
    book.book(b"A:client", b"A:server", 0.0)
    # Someone else later got the address A's client had, and became a sender.
    book.book(b"B:client", b"A:client", 50.0)
    assert book.pending == 1  # A, with a ticket gone, can never complete: dropped
    assert book.arrive("b-recv", b"A:client", 51.0) == Waiting()
    assert book.arrive("b-send", b"B:client", 51.0) == Paired("b-recv")


def test_superseded_pair_with_a_waiting_half_is_expired_at_once():
    book = RoomBook(ttl=100.0)
    book.book(b"A:client", b"A:server", 0.0)
    assert book.arrive("a-recv", b"A:server", 1.0) == Waiting()
    book.book(b"A:server", b"B:server", 2.0)
    assert book.next_deadline() == -math.inf
    assert book.expire(3.0) == ["a-recv"]
    assert book.next_deadline() == 102.0
    assert book.arrive("b-send", b"A:server", 4.0) == Waiting()


def test_equal_identities_still_pair():
    book = RoomBook()
    book.book(b"x:1", b"x:1", 0.0)
    assert book.arrive("one", b"x:1", 0.0) == Waiting()
    assert book.arrive("two", b"x:1", 0.0) == Paired("one")


def test_ttl_is_checked():
    with pytest.raises(ValueError):
        RoomBook(ttl=-1.0)
    with pytest.raises(ValueError):
        RoomBook(ttl=math.nan)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["book", "arrive", "leave", "expire"]),
                          st.integers(0, 5), st.booleans(), st.floats(0, 3)), max_size=60))
def test_random_events_keep_the_book_bounded_and_consistent(events):
    book = RoomBook(ttl=5.0)
    now = 0.0
    holders = 0
    live_holders = set()
    for action, index, half, step in events:
        now += step
        client, server = b"c:%05d" % index, b"s:%05d" % index
        if action == "book":
            book.book(client, server, now)
        elif action == "arrive":
            holders += 1
            result = book.arrive(holders, server if half else client, now)
            if isinstance(result, Waiting):
                live_holders.add(holders)
            elif isinstance(result, Paired):
                assert result.partner in live_holders
                live_holders.discard(result.partner)
        elif action == "leave" and live_holders:
            holder = sorted(live_holders)[index % len(live_holders)]
            book.leave(holder)
            live_holders.discard(holder)
        else:
            closed = book.expire(now)
            assert set(closed) <= live_holders
            live_holders -= set(closed)
        assert book.waiting == len(live_holders)
        assert book.pending <= 6
        deadline = book.next_deadline()
        assert deadline is None or deadline <= now + 5.0
    book.expire(now + 5.0)
    assert (book.pending, book.waiting) == (0, 0)


def test_a_ticket_from_another_address_does_not_take_the_seat():
    book = RoomBook(ttl=10.0)
    book.book(CLIENT, SERVER, 0.0)
    stranger = b"192.0.2.99:4000"
    assert isinstance(book.arrive("thief", SERVER, 1.0, source=stranger), Invalid)
    # The seat is still free for the receiver, which comes from its own address.
    receiver_host = CLIENT.rsplit(b":", 1)[0]
    sender_host = SERVER.rsplit(b":", 1)[0]
    assert book.arrive("recv", SERVER, 1.0, source=receiver_host + b":5555") == Waiting()
    assert book.arrive("send", CLIENT, 1.0, source=sender_host + b":6666") == Paired("recv")
