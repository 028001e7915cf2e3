"""peer/browser/lib/link.js in headless Chromium, both implementations (WebSocketStream and
the classic WebSocket, the fallback of browsers without it) against a small WebSocket
server of our own: the same behaviour from both, and real backpressure from the stream one
(the server's sends block while the page does not read)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from browser import app_server, browser_missing, chromium, run_js

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")

IMPLEMENTATIONS = ["stream", "classic"]
PATTERN_PERIOD = 251  # byte i of a stream is i % 251, so any loss, repeat or reorder shows
MIB = 1024 * 1024
# The largest whole number of periods in one relay message: every message starts at 0.
FLOOD_MESSAGE = bytes(i % PATTERN_PERIOD for i in range(PATTERN_PERIOD * (MIB // PATTERN_PERIOD)))


def pattern(start: int, size: int) -> bytes:
    return bytes((start + i) % PATTERN_PERIOD for i in range(size))


class Server:
    """A WebSocket server on loopback whose path says what to do; what it saw is kept in
    ``seen[id]``, and ``progress[id]`` counts the bytes a flood has handed to its socket."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        self.seen: dict[str, dict[str, Any]] = {}
        self.done: dict[str, threading.Event] = {}
        self.progress: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = serve(self._handle, "127.0.0.1", 0, max_size=None, compression=None)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def expect(self, key: str) -> threading.Event:
        with self._lock:
            return self.done.setdefault(key, threading.Event())

    def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        url = urlsplit(ws.request.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        key = query.get("id", "")
        seen: dict[str, Any] = {"sizes": [], "data": bytearray()}
        try:
            if url.path == "/pattern":
                # Messages of the given sizes, then the given end.
                at = 0
                for size in map(int, filter(None, query["sizes"].split(","))):
                    ws.send(pattern(at, size))
                    at += size
                end = query.get("end", "1000")
                if end == "abrupt":
                    ws.socket.shutdown(socket.SHUT_RDWR)
                elif end != "hold":
                    ws.close(int(end))
                ws.recv(timeout=30)  # until the page goes
            elif url.path == "/sink":
                # Keep what the page sends, message by message, until it closes.
                for message in ws:
                    seen["sizes"].append(len(message))
                    seen["data"] += message
            elif url.path == "/flood":
                total = int(query["total"])
                sent = 0
                while sent < total:
                    ws.send(FLOOD_MESSAGE[: min(len(FLOOD_MESSAGE), total - sent)])
                    sent += min(len(FLOOD_MESSAGE), total - sent)
                    self.progress[key] = sent
                if query.get("wait"):
                    ws.recv(timeout=60)  # the page says it has it all, as our ACK does
                ws.close(1000)
            elif url.path == "/silent":
                ws.recv(timeout=30)
        except (ConnectionClosed, TimeoutError, OSError):
            pass
        finally:
            seen["close_code"] = ws.close_code
            self.seen[key] = seen
            self.expect(key).set()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    server = Server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    with app_server() as origin:
        yield origin


@pytest.fixture(scope="module")
def page(origin):
    with chromium() as driver:
        driver.get(origin + "/")
        yield driver


IMPORT = "const L = await import('./lib/link.js');"

# Receive until the end, checking every byte; the outcome as JSON.
RECEIVE_ALL = IMPORT + """
const [url, implementation] = args;
const link = await L.Link.open(url, { implementation });
const out = { implementation: link.implementation, chunks: 0, taken: 0, bad: -1 };
try {
  for (let i = 0; i < 100000; i++) {
    const data = await link.receive();
    if (data === null) {
      out.end = 'null';
      out.again = await link.receive();
      break;
    }
    for (let j = 0; j < data.length; j++) {
      if (data[j] !== (out.taken + j) % 251 && out.bad < 0) out.bad = out.taken + j;
    }
    out.taken += data.length;
    out.chunks += 1;
  }
} catch (error) {
  out.end = 'error';
  out.error = [error.constructor.name, error.message, error instanceof L.LinkError];
}
out.bytesReceived = link.bytesReceived;
link.close();
return out;
"""


def test_chromium_uses_the_stream_by_default(page, server):
    result = run_js(page, IMPORT + """
const link = await L.Link.open(args[0]);
const kind = link.implementation;
link.close();
return [kind, L.defaultImplementation(), typeof WebSocketStream];
""", server.url("/silent?id=default"))
    assert result == ["stream", "stream", "function"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("code", [1000, 1001])
def test_bytes_in_order_across_many_messages_then_a_clean_close(page, server, implementation, code):
    rng = random.Random(14)
    sizes = [rng.choice([1, 2, 100, 4096, 65536, 200_000]) for _ in range(150)] + [0, MIB, 3, MIB, 17]
    url = server.url(f"/pattern?id=order-{implementation}-{code}&end={code}&sizes={','.join(map(str, sizes))}")
    result = run_js(page, RECEIVE_ALL, url, implementation)
    assert result["implementation"] == implementation
    assert result["bad"] == -1
    assert result["taken"] == result["bytesReceived"] == sum(sizes)
    assert result["end"] == "null" and result["again"] is None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_connection_dropped_without_a_close_frame_is_lost(page, server, implementation):
    sizes = [50_000] * 8
    url = server.url(f"/pattern?id=abrupt-{implementation}&end=abrupt&sizes={','.join(map(str, sizes))}")
    result = run_js(page, RECEIVE_ALL, url, implementation)
    assert result["end"] == "error"
    assert result["error"] == ["LinkError", "the connection to the relay was lost", True]
    assert result["bad"] == -1
    # The classic link may drop what it had queued once it knows the end; the stream one
    # learns of the end only after reading everything before it.
    assert result["taken"] <= sum(sizes)
    if implementation == "stream":
        assert result["taken"] == sum(sizes)


def test_both_implementations_agree_on_a_close_with_an_error_code(page, server):
    # A Close frame with 1011 that completes the closing handshake: the classic link counts
    # any clean closing handshake as a clean end (wasClean); the stream one must agree.
    outcomes = [
        run_js(page, RECEIVE_ALL, server.url(f"/pattern?id=1011-{kind}&end=1011&sizes=10,20"), kind)
        for kind in IMPLEMENTATIONS
    ]
    for outcome in outcomes:
        assert outcome["taken"] == 30 and outcome["bad"] == -1
    assert outcomes[0]["end"] == outcomes[1]["end"]
    assert outcomes[0].get("error") == outcomes[1].get("error")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_abort_while_receiving_and_before_opening(page, server, implementation):
    result = run_js(page, IMPORT + """
const [url, implementation] = args;
const out = {};
const controller = new AbortController();
const link = await L.Link.open(url, { signal: controller.signal, implementation });
const reason = new Error('stopped by the test');
const receiving = link.receive().then(() => 'resolved', (error) => error === reason ? 'the reason' : String(error));
await new Promise((resolve) => setTimeout(resolve, 20));
controller.abort(reason);
out.receive = await receiving;
out.sendAfter = await link.send(Uint8Array.of(1)).then(() => 'sent', (error) => error === reason ? 'the reason' : String(error));
const plain = new AbortController();
const second = await L.Link.open(url, { signal: plain.signal, implementation });
const pending = second.receive().catch((error) => [error.name, error instanceof DOMException]);
plain.abort();
out.plain = await pending;
const early = new AbortController();
early.abort(reason);
out.early = await L.Link.open(url, { signal: early.signal, implementation })
  .then(() => 'opened', (error) => error === reason ? 'the reason' : String(error));
return out;
""", server.url(f"/silent?id=abort-{implementation}"), implementation)
    assert result == {"receive": "the reason", "sendAfter": "the reason", "plain": ["AbortError", True],
                      "early": "the reason"}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_abort_while_connecting(page, implementation):
    # A listener that never answers the upgrade: the connection stays in its handshake.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        port = mute.getsockname()[1]
        result = run_js(page, IMPORT + """
const [url, implementation] = args;
const controller = new AbortController();
const reason = new Error('gave up');
const opening = L.Link.open(url, { signal: controller.signal, implementation })
  .then(() => 'opened', (error) => error === reason ? 'the reason' : String(error));
await new Promise((resolve) => setTimeout(resolve, 50));
controller.abort(reason);
return await opening;
""", f"ws://127.0.0.1:{port}/handshake", implementation)
    assert result == "the reason"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_an_unreachable_relay_is_one_line(page, implementation):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_js(page, IMPORT + """
const [url, implementation] = args;
return await L.Link.open(url, { implementation })
  .then(() => 'opened', (error) => [error.constructor.name, error.message, error instanceof L.LinkError]);
""", f"ws://127.0.0.1:{port}/handshake", implementation)
    assert result == ["LinkError", f"could not reach the relay at 127.0.0.1:{port}", True]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sends_coalesce_per_turn_split_at_1_mib_and_go_out_before_the_close(page, server, implementation):
    key = f"sink-{implementation}"
    done = server.expect(key)
    result = run_js(page, IMPORT + """
const [url, implementation] = args;
const link = await L.Link.open(url, { implementation });
const bytes = (start, size) => Uint8Array.from({ length: size }, (_, i) => (start + i) % 251);
let at = 0;
const next = (size) => { const piece = bytes(at, size); at += size; return piece; };
// One turn: 1000 pieces of 3000 bytes.
await Promise.all(Array.from({ length: 1000 }, () => link.send(next(3000))));
// One piece of 2.5 MiB, then small ones in separate turns.
await link.send(next(2.5 * 1024 * 1024));
for (let i = 0; i < 5; i++) await link.send(next(10));
// Reusing a sent buffer once `send` resolved must not change what goes out.
const reused = next(4096);
await link.send(reused);
reused.fill(0);
link.close(); // right away: what was sent still goes first
const after = await link.send(Uint8Array.of(1)).then(() => 'sent', (error) => [error.constructor.name, error.message]);
return { sent: link.bytesSent, total: at, after };
""", server.url(f"/sink?id={key}"), implementation)
    assert done.wait(30)
    seen = server.seen[key]
    total = 3000 * 1000 + MIB * 5 // 2 + 50 + 4096
    assert result == {"sent": total, "total": total, "after": ["LinkError", "the connection to the relay was lost"]}
    assert bytes(seen["data"]) == pattern(0, total)
    assert seen["sizes"] == [MIB, MIB, 3_000_000 - 2 * MIB, MIB, MIB, MIB // 2, 10, 10, 10, 10, 10, 4096]
    assert seen["close_code"] == 1000


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_take_queued_gives_what_receive_has_not_taken(page, server, implementation):
    sizes = [1000, 2000, 3000, 4000]
    url = server.url(f"/pattern?id=queued-{implementation}&end=1000&sizes={','.join(map(str, sizes))}")
    result = run_js(page, IMPORT + """
const [url, implementation] = args;
const link = await L.Link.open(url, { implementation });
const got = [];
got.push(await link.receive());
await new Promise((resolve) => setTimeout(resolve, 100));
const queued = link.takeQueued();
got.push(...queued);
for (let i = 0; i < 10; i++) {
  const data = await link.receive();
  if (data === null) break;
  got.push(data);
}
const all = new Uint8Array(got.reduce((n, piece) => n + piece.length, 0));
let at = 0;
for (const piece of got) { all.set(piece, at); at += piece.length; }
return { queued: queued.length, ok: all.every((value, i) => value === i % 251), total: all.length,
         empty: link.takeQueued().length };
""", url, implementation)
    assert result["ok"] and result["total"] == sum(sizes) and result["empty"] == 0
    # Both read on while the page waits (the stream up to READ_AHEAD): all but the first.
    assert result["queued"] == 3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_small_messages_right_before_the_close_survive_an_idle_page(page, server, implementation):
    # Chromium 156's WebSocketStream drops the messages that come with the Close while no
    # read is pending; the link must keep reading while it is under READ_AHEAD.
    sizes = [1000] * 6 + [2, 30, 1]
    url = server.url(f"/pattern?id=tail-{implementation}&end=1000&sizes={','.join(map(str, sizes))}")
    result = run_js(page, IMPORT + """
const [url, implementation] = args;
const link = await L.Link.open(url, { implementation });
const got = [await link.receive()];
await new Promise((resolve) => setTimeout(resolve, 300)); // the Close arrives meanwhile
for (let i = 0; i < 20; i++) {
  const data = await link.receive();
  if (data === null) break;
  got.push(data);
}
let at = 0, ok = true;
for (const piece of got) for (const value of piece) if (value !== at++ % 251) ok = false;
return { total: at, ok };
""", url, implementation)
    assert result == {"total": sum(sizes), "ok": True}


# --- backpressure ---------------------------------------------------------------------------

FLOOD_TOTAL = 512 * MIB
FIRST_READ = 64 * MIB


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def renderer_memory(driver: Any) -> dict[str, float]:
    """The largest VmRSS and VmHWM (MiB) among the browser's renderer processes."""
    rss = hwm = 0.0
    for pid in _descendants(driver.service.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"--type=renderer" not in cmdline.read():
                    continue
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        rss = max(rss, int(fields["VmRSS"].split()[0]) / 1024)
        hwm = max(hwm, int(fields["VmHWM"].split()[0]) / 1024)
    return {"rss": round(rss, 1), "hwm": round(hwm, 1)}


def wait_until_stalled(server: Server, key: str) -> int:
    """The flood's count once it stopped growing (or finished): 5 polls unchanged."""
    last, still = -1, 0
    for _ in range(600):  # at most ~60 s
        now = server.progress.get(key, 0)
        if now >= FLOOD_TOTAL:
            return now
        still = still + 1 if now == last else 0
        if still >= 5:
            return now
        last = now
        time.sleep(0.1)
    return server.progress.get(key, 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_page_that_stops_reading_holds_back_the_sender(origin, server, implementation):
    # A browser of its own, so that the renderer's peak memory is this test's alone.
    key = f"flood-{implementation}"
    with chromium() as driver:
        driver.get(origin + "/")
        before = renderer_memory(driver)
        taken = run_js(driver, IMPORT + """
const [url, implementation, first] = args;
const link = await L.Link.open(url, { implementation });
window.flood = { link, taken: 0, bad: 0 };
while (window.flood.taken < first) {
  const data = await link.receive();
  if (data === null) throw new Error('ended early');
  if (data[0] !== 0) window.flood.bad += 1;
  window.flood.taken += data.length;
}
return window.flood.taken;
""", server.url(f"/flood?id={key}&total={FLOOD_TOTAL}&wait=1"), implementation, FIRST_READ)
        pushed = wait_until_stalled(server, key)
        paused = renderer_memory(driver)
        # Then a slow reader (at most ~320 MiB/s: a pause of 50 ms every 16 MiB) to the end.
        result = run_js(driver, IMPORT + """
const flood = window.flood;
let sinceRest = 0;
for (let i = 0; i < 100000; i++) {
  const data = await flood.link.receive();
  if (data[0] !== 0) flood.bad += 1;
  flood.taken += data.length;
  if (flood.taken >= args[0]) break;
  sinceRest += data.length;
  if (sinceRest >= 16 * 1024 * 1024) {
    sinceRest = 0;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
await flood.link.send(Uint8Array.of(6)); // the server closes once it hears this
const end = await flood.link.receive();
flood.link.close();
return { taken: flood.taken, bad: flood.bad, received: flood.link.bytesReceived, end };
""", FLOOD_TOTAL)
        after = renderer_memory(driver)
    ahead = pushed - taken
    print(f"\n{implementation}: the page took {taken / MIB:.0f} MiB and stopped; the server had then pushed "
          f"{pushed / MIB:.1f} MiB ({ahead / MIB:.1f} MiB in flight); renderer RSS {before['rss']} MiB at start, "
          f"{paused['rss']} MiB while paused, peak (VmHWM) {after['hwm']} MiB for {FLOOD_TOTAL // MIB} MiB")
    assert result == {"taken": FLOOD_TOTAL, "bad": 0, "received": FLOOD_TOTAL, "end": None}
    if implementation == "stream":
        assert ahead < 64 * MIB
        assert after["hwm"] < 300


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_close_while_the_page_pauses_is_never_a_silent_truncation(page, server, implementation):
    # The server sends 13 MiB and closes at once, while the page has taken 8 MiB and pauses:
    # the stream link is then READ_AHEAD ahead and no longer reading, which is when
    # Chromium drops what it held back. It must end with LinkError, not a short clean end.
    key = f"cut-{implementation}"
    done = server.expect(key)
    total = 13 * MIB
    taken = run_js(page, IMPORT + """
const [url, implementation] = args;
const link = await L.Link.open(url, { implementation });
window.cut = { link, taken: 0 };
while (window.cut.taken < 8 * 1024 * 1024) window.cut.taken += (await link.receive()).length;
return window.cut.taken;
""", server.url(f"/flood?id={key}&total={total}"), implementation)
    closed = done.wait(10)  # the stream's socket buffers may hold back the last bytes
    result = run_js(page, IMPORT + """
const cut = window.cut;
try {
  for (let i = 0; i < 1000; i++) {
    const data = await cut.link.receive();
    if (data === null) return { taken: cut.taken, end: 'clean' };
    cut.taken += data.length;
  }
  return { taken: cut.taken, end: 'endless' };
} catch (error) {
  return { taken: cut.taken, end: [error.constructor.name, error.message] };
} finally {
  cut.link.close();
}
""")
    print(f"\n{implementation}: closed while paused: {closed}; then {result}")
    assert taken >= 8 * MIB
    if result["end"] == "clean":
        assert result["taken"] == total
    else:
        assert result["end"] == ["LinkError", "the connection to the relay was lost"]
        assert result["taken"] <= total
    if implementation == "classic":
        assert result == {"taken": total, "end": "clean"}
