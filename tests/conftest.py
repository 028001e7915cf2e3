"""Fixtures shared by the test modules."""

import pytest

from processes import start_relay, stop_relay


@pytest.fixture
def relay_process():
    relay = start_relay()
    try:
        yield relay
    finally:
        if relay.process.poll() is None:
            stop_relay(relay)
