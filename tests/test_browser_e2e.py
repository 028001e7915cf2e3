"""The browser peer end to end: the page as the relay itself serves it, in headless Chromium,
against real `peer send` and `peer recv` processes through a real relay.

Everything goes through the page's automation contract (issue 14): `/#receive/CODE`,
`data-action="accept"`, `input[data-role="send-files"]`, `[data-role="code"]`,
`[data-state="done"]` / `[data-state="failed"]`. A received file arrives as a regular
download, checked byte for byte. The screenshots land in test-artefacts/browser/.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from browser import browser_missing, chromium
from peer.codes import generate_code
from processes import ROOT, peer
from transport_helpers import start_relay

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or ""),
]

SHOTS = ROOT / "test-artefacts" / "browser"
MiB = 1 << 20
LIMIT = 90  # seconds: the bound of every wait below (a 20 MiB transfer takes a few)
PHONE = {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay():
    relay = start_relay("--ws-port", "0")
    try:
        yield relay
    finally:
        relay.stop()


# Runs before the page's own scripts (CDP-injected, so outside the page's CSP): records every
# WebSocket URL the page opens (either API), for the check that the code is in none of them.
RECORD_SOCKETS = """
window.__sockets = [];
for (const name of ['WebSocket', 'WebSocketStream']) {
  const Original = window[name];
  if (typeof Original !== 'function') continue;
  window[name] = class extends Original {
    constructor(url, ...rest) { super(url, ...rest); window.__sockets.push(String(url)); }
  };
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("downloads")) as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_SOCKETS})
        yield driver


@pytest.fixture
def downloads(driver, tmp_path):
    """This test's own downloads folder, so that no test sees another's files."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    driver.get_log("browser")  # what earlier tests logged is theirs
    yield folder
    refused = [entry["message"] for entry in driver.get_log("browser")
               if "Content Security Policy" in entry["message"] or "Refused to" in entry["message"]]
    assert not refused, f"the page broke its own Content-Security-Policy: {refused}"


def page(relay, fragment: str = "receive") -> str:
    return f"http://127.0.0.1:{relay.ws_port}/#{fragment}"


def open_page(driver, url: str) -> None:
    # A new document each time: a fragment change alone would keep the last test's state.
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get(url)
    # The HTML shows before its modules run; act only once the views listen.
    WebDriverWait(driver, LIMIT, poll_frequency=0.05).until(
        lambda d: d.execute_script("return document.documentElement.dataset.page") == "ready",
        "the page's modules never started")


# -- peers whose output is read while they run ---------------------------------------------


class Peer:
    """A `peer` process whose stdout and stderr are collected as they come, so that a test
    can wait for a line (the code, the verification string) while the peer still runs."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.process = peer(*args, cwd=cwd)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(pipe, into), daemon=True)
                        for pipe, into in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, into: list[str]) -> None:
        for line in iter(pipe.readline, b""):
            into.append(line.decode(errors="replace"))

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, pattern: str, timeout: float = LIMIT) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.stdout + self.stderr)
            if match:
                return match
            if self.process.poll() is not None and not any(r.is_alive() for r in self.readers):
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} from peer: {self.stdout + self.stderr}")

    def finish(self, timeout: float = LIMIT) -> int:
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"peer did not finish in {timeout} s: {self.stderr}") from None
        for reader in self.readers:
            reader.join(10)
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        for reader in self.readers:
            reader.join(10)


@pytest.fixture
def peers():
    """Every peer a test starts is stopped at its end, whatever happened."""
    started: list[Peer] = []

    def start(*args: str, cwd: Path) -> Peer:
        started.append(Peer(*args, cwd=cwd))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        for pipe in (process.process.stdout, process.process.stderr):
            pipe.close()


# -- the page ------------------------------------------------------------------------------


def shown(driver, css: str):
    """The first displayed element matching ``css``, or None."""
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.CSS_SELECTOR, css):
        if element.is_displayed():
            return element
    return None


def wait_shown(driver, css: str, timeout: float = LIMIT):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: shown(d, css))
    except TimeoutException:
        said = driver.execute_script(
            "return [...document.querySelectorAll('.alert, .result, .status, .warning')]"
            ".filter(e => e.offsetParent !== null).map(e => e.textContent.trim())")
        raise AssertionError(f"{css} never appeared; the page says {said}") from None


def outcome(driver, view: str, timeout: float = LIMIT) -> tuple[str, str]:
    """The view's final state (done or failed) and its one line."""
    element = wait_shown(driver, f'[data-view="{view}"] [data-state]', timeout)
    return element.get_attribute("data-state"), element.text


def wait_progress(driver, view: str, at_least: int, timeout: float = LIMIT) -> None:
    """Until the view's progress bar has passed ``at_least`` bytes."""
    from selenium.webdriver.support.ui import WebDriverWait

    def moved(d):
        bar = shown(d, f'[data-view="{view}"] progress')
        return bar is not None and float(bar.get_attribute("value") or 0) >= at_least

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(moved, f"{view}: no progress")


def verification(driver, view: str) -> str:
    role = "offer-check" if view == "receive" else "send-check"
    return wait_shown(driver, f'[data-view="{view}"] [data-role="{role}"]').text


def downloaded(folder: Path, name: str, timeout: float = LIMIT) -> Path:
    """The finished download ``name``: Chromium writes NAME.crdownload (or 'Unconfirmed
    N.crdownload') and gives the final name only once the download completed."""
    deadline = time.monotonic() + timeout
    path = folder / name
    while time.monotonic() < deadline:
        if path.exists() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} never finished downloading: {sorted(os.listdir(folder))}")


def screenshot(driver, name: str) -> None:
    """Save the view as test-artefacts/browser/NAME-WIDTH.png, and check the page fits its
    width: a phone must never scroll sideways."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    scroll, inner = driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll <= inner, f"{name}: the page is {scroll} px wide in a {inner} px window"
    driver.save_screenshot(str(SHOTS / f"{name}-{inner}.png"))


# -- senders and their payloads ------------------------------------------------------------


def sender_relay(relay, transport: str) -> list[str]:
    return relay.tcp_args() if transport == "tcp" else relay.ws_args()


def make_tree(root: Path) -> dict[str, bytes]:
    """A directory with nested folders, an empty file and an empty folder; returns the
    files' contents by their path inside it."""
    files = {
        "a.txt": b"hello from the tree\n",
        "sub/b.bin": os.urandom(300_000),
        "sub/deeper/c.bin": os.urandom(1_500_000),
        "sub/deeper/empty.txt": b"",
        "other/d.md": "# ünïcödé\n".encode(),
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "sub" / "vacant").mkdir()
    return files


# -- receiving -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_the_browser_receives_a_20_mib_file(relay, driver, downloads, peers, tmp_path, transport):
    data = os.urandom(20 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    if transport == "tcp":
        code = generate_code()
        sender = peers("send", *relay.tcp_args(), "--password", code, "big.bin", cwd=tmp_path)
        sender.wait_for("On the other machine run")
        link = page(relay, f"receive/{code}")
    else:
        # A generated code: `peer send` prints the page's link, and the link is what we open.
        sender = peers("send", *relay.ws_args(), "big.bin", cwd=tmp_path)
        code = sender.wait_for(r"Code: (\S+)")[1]
        link = sender.wait_for(r"Or open in a browser: (\S+)")[1]
        assert link == page(relay, f"receive/{code}")

    open_page(driver, link)
    wait_shown(driver, '[data-action="accept"]')
    offer = shown(driver, '[data-role="offer-summary"]').text
    assert "big.bin" in offer and "20.0 MiB" in offer
    check = verification(driver, "receive")
    assert f"(verification {check})" in sender.wait_for(r"Sending .*\(verification [0-9a-f-]+\)")[0]
    shown(driver, '[data-action="accept"]').click()

    state, line = outcome(driver, "receive")
    assert (state, line) == ("done", "Received 1 file, 20.0 MiB, saved as big.bin")
    assert downloaded(downloads, "big.bin").read_bytes() == data
    assert sender.finish() == 0, sender.stderr
    assert sorted(os.listdir(downloads)) == ["big.bin"]
    # The code never left the browser: not in the address bar once read, and in no URL the
    # page fetched (scripts, styles, the word list) or connected to (WebSockets). The
    # navigation's own URL holds it only in the fragment, which no HTTP request carries.
    assert code not in driver.current_url
    asked = driver.execute_script(
        "return [...performance.getEntriesByType('resource').map(e => e.name), ...(window.__sockets || [])]")
    assert any("/handshake" in url for url in asked), asked  # the recorder saw the sockets
    words = code.split("-")[1:]
    assert not [url for url in asked if any(word in url for word in words)], asked


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_the_browser_receives_a_directory_as_a_zip(relay, driver, downloads, peers, tmp_path, transport):
    files = make_tree(tmp_path / "album")
    code = generate_code()
    sender = peers("send", *sender_relay(relay, transport), "--password", code, "album", cwd=tmp_path)
    sender.wait_for("On the other machine run")

    open_page(driver, page(relay, f"receive/{code}"))
    wait_shown(driver, '[data-action="accept"]').click()
    state, line = outcome(driver, "receive")
    assert (state, line) == ("done", "Received 5 files, 1.7 MiB, saved as album.zip"), line
    assert sender.finish() == 0, sender.stderr

    with zipfile.ZipFile(downloaded(downloads, "album.zip")) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        got = {name: archive.read(name) for name in names if not name.endswith("/")}
    assert got == {f"album/{path}": data for path, data in files.items()}
    assert "album/sub/vacant/" in names  # an empty folder survives too


def test_a_wrong_code_fails_in_one_line(relay, driver, downloads, peers, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"secret")
    code = generate_code()
    sender = peers("send", *relay.tcp_args(), "--password", code, "f.txt", cwd=tmp_path)
    sender.wait_for("On the other machine run")
    nameplate, *words = code.split("-")
    wrong = "-".join([nameplate, *reversed(words)])

    open_page(driver, page(relay, f"receive/{wrong}"))
    state, line = outcome(driver, "receive")
    assert state == "failed"
    assert "\n" not in line and "code" in line.lower(), line
    assert sender.process.poll() is None  # one wrong guess: the sender still waits
    assert os.listdir(downloads) == []


def test_a_declined_offer_stops_both_sides(relay, driver, downloads, peers, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"unwanted")
    code = generate_code()
    sender = peers("send", *relay.tcp_args(), "--password", code, "f.txt", cwd=tmp_path)
    sender.wait_for("On the other machine run")

    open_page(driver, page(relay, f"receive/{code}"))
    wait_shown(driver, '[data-action="decline"]').click()
    state, line = outcome(driver, "receive")
    assert state == "failed" and "declined" in line.lower() and "\n" not in line, line
    assert sender.finish() != 0
    assert "declined" in sender.stderr
    assert os.listdir(downloads) == []


def test_a_sender_vanishing_mid_transfer_leaves_nothing_under_the_final_name(
        relay, driver, downloads, peers, tmp_path):
    (tmp_path / "slow.bin").write_bytes(os.urandom(32 * MiB))
    code = generate_code()
    sender = peers("send", *relay.tcp_args(), "--password", code, "--limit-rate", "2M", "slow.bin",
                   cwd=tmp_path)
    sender.wait_for("On the other machine run")

    open_page(driver, page(relay, f"receive/{code}"))
    wait_shown(driver, '[data-action="accept"]').click()
    wait_progress(driver, "receive", 2 * MiB)
    sender.kill()

    state, line = outcome(driver, "receive")
    assert state == "failed" and "\n" not in line and line, line
    # Chromium drops a failed download's partial file; give a late rename the time to show.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert not (downloads / "slow.bin").exists(), "a partial file got the final name"
        time.sleep(0.1)


def test_word_completion_and_a_mistyped_word_questioned_before_it_costs_an_attempt(
        relay, driver, downloads):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(driver, page(relay))
    field = wait_shown(driver, '[data-role="code-input"]')
    field.send_keys("417-cobal", Keys.TAB)
    assert field.get_attribute("value") == "417-cobalt-"
    field.send_keys("lemno-unicycle", Keys.ENTER)
    text = wait_shown(driver, '[data-role="review-text"]').text
    assert text == "“lemno” is not in the word list. Did you mean 417-cobalt-lemon-unicycle?"
    assert driver.execute_script("return window.__sockets") == []  # no attempt spent
    shown(driver, '[data-action="use-correction"]').click()
    WebDriverWait(driver, LIMIT, poll_frequency=0.05).until(
        lambda d: d.execute_script("return window.__sockets.length") >= 1, "the corrected code was not tried")
    shown(driver, '[data-view="receive"] [data-action="cancel"]').click()
    assert outcome(driver, "receive") == ("failed", "You cancelled.")


# -- sending -------------------------------------------------------------------------------


def test_the_browser_sends_two_files_to_peer_recv(relay, driver, downloads, peers, tmp_path):
    first, second = tmp_path / "first.bin", tmp_path / "second name.txt"
    first.write_bytes(os.urandom(3 * MiB + 17))
    second.write_bytes("two files, one offer\n".encode())
    open_page(driver, page(relay, "send"))
    wait_shown(driver, 'input[type=file][data-role="send-files"]').send_keys(f"{first}\n{second}")
    wait_shown(driver, '[data-action="send"]').click()

    code = wait_shown(driver, '[data-role="code"]').text
    command = shown(driver, '[data-role="command"]').text
    assert command == f"peer recv --relay ws://127.0.0.1:{relay.ws_port}/ {code}"
    link = shown(driver, '[data-role="link"]').text
    assert link == page(relay, f"receive/{code}")
    out = tmp_path / "out"
    # The very line the page shows, run as shown (plus -y and a destination).
    receiver = peers(*shlex.split(command)[1:], "-y", "-o", f"{out}/", cwd=tmp_path)

    check = verification(driver, "send")
    state, line = outcome(driver, "send")
    assert (state, line) == ("done", "The receiver confirmed 2 files, 3.0 MiB")
    assert receiver.finish() == 0, receiver.stderr
    assert f"verification {check}" in receiver.stderr
    assert (out / "first.bin").read_bytes() == first.read_bytes()
    assert (out / "second name.txt").read_bytes() == second.read_bytes()


def test_the_browser_sends_a_picked_folder_to_peer_recv(relay, driver, downloads, peers, tmp_path):
    # The folder picker (<input webkitdirectory>): the browser gives each file its path
    # under the picked folder, and peer recv rebuilds the tree. Browsers leave empty
    # folders out of a picked folder, so only the files travel.
    from selenium.webdriver.common.by import By

    files = make_tree(tmp_path / "album")
    open_page(driver, page(relay, "send"))
    folder_input = driver.find_element(By.CSS_SELECTOR, 'input[type=file][data-role="send-folder"]')
    folder_input.send_keys(str(tmp_path / "album"))
    wait_shown(driver, '[data-action="send"]').click()
    code = wait_shown(driver, '[data-role="code"]').text
    out = tmp_path / "out"
    receiver = peers("recv", *relay.ws_args(), "-y", "-o", f"{out}/", code, cwd=tmp_path)
    state, line = outcome(driver, "send")
    assert state == "done", line
    assert receiver.finish() == 0, receiver.stderr
    got = {str(p.relative_to(out / "album")): p.read_bytes() for p in (out / "album").rglob("*") if p.is_file()}
    assert got == files


def test_a_receiver_vanishing_mid_transfer_fails_the_sending_page_in_one_line(
        relay, driver, downloads, peers, tmp_path):
    # A sparse file: 256 MiB to read costs no disk, and lasts seconds through the page.
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(256 * MiB)
    open_page(driver, page(relay, "send"))
    wait_shown(driver, 'input[type=file][data-role="send-files"]').send_keys(str(big))
    wait_shown(driver, '[data-action="send"]').click()
    code = wait_shown(driver, '[data-role="code"]').text
    receiver = peers("recv", *relay.ws_args(), "-y", "-o", f"{tmp_path / 'out'}/", code, cwd=tmp_path)
    wait_progress(driver, "send", 4 * MiB)
    receiver.kill()

    state, line = outcome(driver, "send")
    # Which one depends on whether the relay's close reached the page cleanly.
    assert state == "failed" and line in {
        "The receiver went away before confirming the transfer",
        "The connection through the relay was lost"}, line
    assert not (tmp_path / "out" / "big.bin").exists()


def test_one_browser_sends_to_another(relay, driver, downloads, tmp_path):
    first, second = tmp_path / "a.bin", tmp_path / "b.txt"
    first.write_bytes(os.urandom(2 * MiB + 3))
    second.write_bytes(b"from one tab to another\n")
    open_page(driver, page(relay, "send"))
    sending = driver.current_window_handle
    wait_shown(driver, 'input[type=file][data-role="send-files"]').send_keys(f"{first}\n{second}")
    wait_shown(driver, '[data-action="send"]').click()
    code = wait_shown(driver, '[data-role="code"]').text

    driver.switch_to.new_window("tab")
    try:
        driver.get(page(relay, f"receive/{code}"))
        accept = wait_shown(driver, '[data-action="accept"]')
        received = verification(driver, "receive")
        accept.click()
        state, line = outcome(driver, "receive")
        nameplate = code.split("-")[0]
        assert (state, line) == ("done", f"Received 2 files, 2.0 MiB, saved as peer-relay-{nameplate}.zip")
    finally:
        driver.close()
        driver.switch_to.window(sending)
    assert outcome(driver, "send") == ("done", "The receiver confirmed 2 files, 2.0 MiB")
    # The sender's page showed it while it waited; done, it keeps it in the (hidden) row.
    assert driver.execute_script(
        "return document.querySelector('[data-role=\"send-check\"]').textContent") == received
    with zipfile.ZipFile(downloaded(downloads, f"peer-relay-{nameplate}.zip")) as archive:
        assert archive.testzip() is None
        assert {name: archive.read(name) for name in archive.namelist()} == {
            "a.bin": first.read_bytes(), "b.txt": second.read_bytes()}


# -- how it looks --------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1280, 375])
def test_screenshots_of_every_view(relay, driver, downloads, peers, tmp_path, width):
    if width < 1280:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        open_page(driver, page(relay))
        field = wait_shown(driver, '[data-role="code-input"]')
        field.send_keys("417-cobalt-le")
        wait_shown(driver, '[data-role="suggestions"] button')
        screenshot(driver, "code-entry")

        (tmp_path / "photos" / ".meta").mkdir(parents=True)
        (tmp_path / "photos" / "beach.jpg").write_bytes(os.urandom(9 * MiB))
        (tmp_path / "photos" / "dunes.jpg").write_bytes(os.urandom(3 * MiB))
        (tmp_path / "photos" / ".meta" / "album.json").write_bytes(b"{}")
        (tmp_path / "notes.md").write_bytes(b"# trip\n")
        code = generate_code()
        sender = peers("send", *relay.tcp_args(), "--password", code, "--limit-rate", "3M",
                       "photos", "notes.md", cwd=tmp_path)
        sender.wait_for("On the other machine run")
        open_page(driver, page(relay, f"receive/{code}"))
        wait_shown(driver, '[data-action="accept"]')
        screenshot(driver, "offer")
        shown(driver, '[data-action="accept"]').click()
        wait_progress(driver, "receive", 2 * MiB)
        screenshot(driver, "progress")
        assert outcome(driver, "receive")[0] == "done"
        screenshot(driver, "done")
        assert sender.finish() == 0, sender.stderr

        open_page(driver, page(relay, "send"))
        wait_shown(driver, 'input[type=file][data-role="send-files"]').send_keys(
            f"{tmp_path / 'notes.md'}\n{tmp_path / 'photos' / 'dunes.jpg'}")
        wait_shown(driver, '[data-action="send"]')
        screenshot(driver, "send-selection")
        shown(driver, '[data-action="send"]').click()
        wait_shown(driver, '[data-role="code"]')
        screenshot(driver, "send-code")
        shown(driver, '[data-view="send"] [data-action="cancel"]').click()
        assert outcome(driver, "send") == ("failed", "You cancelled.")
    finally:
        if width < 1280:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
