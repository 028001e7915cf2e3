"""docs/nginx-cluster.conf run by a real nginx in front of three real relay instances.

The shipped file is rendered for loopback ports and test certificates (as tests/test_nginx.py
does for docs/nginx.conf). Which instance served a connection or a room is read from each
instance's own metrics. The peers are in-process (tests/inprocess.py): the real handshake,
meeting, channel and disk sides over wss:// through nginx, cheap enough for 20 at once.

Uses /usr/sbin/nginx and installs nothing; where it is missing the tests are skipped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import attrs
import pytest
import trio

from inprocess import run_pair
from peer.address import RelayAddress, parse_relay
from processes import ROOT, child_env, ready_line, stop_quietly
from relay.websocket import connect as websocket_connect
from test_nginx import NGINX, free_port, wait_listening
from transport_helpers import make_certificates

EXAMPLE = ROOT / "docs" / "nginx-cluster.conf"
INSTANCES = 3
PAIRS = 20
LIMIT = 120.0
"""Seconds a batch of pairs may take on a loaded machine before it is a failure."""

READY = re.compile(
    rb"listening on 127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+) \(secure room\), "
    rb"127\.0\.0\.1:(\d+) \(websocket\); metrics on 127\.0\.0\.1:(\d+)")

pytestmark = pytest.mark.skipif(
    not NGINX.exists(),
    reason="nginx is not installed (/usr/sbin/nginx); CI installs Debian's nginx-light package",
)


@attrs.frozen
class Instance:
    """One relay process of the cluster and its ports."""

    process: subprocess.Popen
    ws_port: int
    metrics_port: int

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of this instance's metrics (``labels`` as in the exposition, or none)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        assert match, f"no {name}{labels} in the metrics of instance {self.ws_port}"
        return float(match[1])

    def stop(self) -> None:
        stop_quietly(self.process)


def start_instance() -> Instance:
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0",
         "--ws-port", "0", "--metrics", "127.0.0.1:0", "--trust-proxy", "127.0.0.1", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env())
    match = ready_line(process, READY, 20.0)
    return Instance(process, int(match[3]), int(match[4]))


def configure(workdir: Path, listen_port: int, ws_ports: list[int], cert: Path, key: Path) -> Path:
    """docs/nginx-cluster.conf with loopback ports, test certificates, paths in ``workdir``."""
    text = EXAMPLE.read_text()
    substitutions = [
        (r"listen 443 ssl;", f"listen 127.0.0.1:{listen_port} ssl;"),
        (r"\n\s*listen \[::\]:443 ssl;", ""),  # loopback IPv4 only in tests
        (r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};"),
    ]
    for pattern, replacement in substitutions:
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"docs/nginx-cluster.conf no longer has {pattern!r}"
    # The instances: 127.0.0.1:90N2 is instance N's WebSocket port.
    text, count = re.subn(r"server 127\.0\.0\.1:90(\d)2 ",
                          lambda m: f"server 127.0.0.1:{ws_ports[int(m[1]) - 1]} ", text)
    assert count == len(ws_ports), "docs/nginx-cluster.conf no longer lists 3 instances"
    temp = [(name, workdir / name) for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    config = "\n".join([
        "daemon off;",
        "master_process on;",
        "worker_processes 2;",  # two workers: the failure state must be shared (zone)
        "user root;" if os.geteuid() == 0 else "",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'error.log'} info;",
        "events { worker_connections 1024; }",
        "http {",
        "    access_log off;",
        *(f"    {name}_temp_path {path};" for name, path in temp),
        text,
        "}",
    ])
    path = workdir / "nginx.conf"
    path.write_text(config)
    return path


@attrs.frozen
class Cluster:
    instances: list[Instance]
    address: RelayAddress
    """Where the peers go: nginx's wss:// address, trusting the test authority."""
    port: int

    def rooms(self) -> list[float]:
        """Rooms opened so far by each instance still running (None for a stopped one)."""
        return [instance.metric("peer_relay_rooms_opened_total")
                if instance.process.poll() is None else None for instance in self.instances]


@pytest.fixture
def cluster(tmp_path):
    certificates = make_certificates(tmp_path)
    instances: list[Instance] = []
    process = None
    try:
        for _ in range(INSTANCES):
            instances.append(start_instance())
        workdir = tmp_path / "nginx"
        workdir.mkdir()
        port = free_port()
        config = configure(workdir, port, [i.ws_port for i in instances],
                           certificates.cert, certificates.key)
        process = subprocess.Popen(
            [str(NGINX), "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, process, workdir / "error.log")
        address = parse_relay(f"wss://127.0.0.1:{port}/peer-relay/", cacert=str(certificates.ca))
        yield Cluster(instances, address, port)
    finally:
        if process is not None:
            stop_quietly(process, signal.SIGQUIT)  # nginx's graceful stop
        for instance in instances:
            instance.stop()


async def open_handshake(cluster: Cluster, query: str) -> trio.abc.Stream:
    """A WebSocket to nginx's /peer-relay/handshake with ``query``, as a peer opens it."""
    from peer.transport import client_tls_context

    tcp = await trio.open_tcp_stream("127.0.0.1", cluster.port)
    stream = trio.SSLStream(tcp, client_tls_context(cluster.address.cacert),
                            server_hostname="127.0.0.1", https_compatible=True)
    await stream.do_handshake()
    return await websocket_connect(stream, host=cluster.address.host_header(),
                                   path=f"/peer-relay/handshake{query}")


async def instance_of(cluster: Cluster, query: str) -> int:
    """Which instance a handshake connection with ``query`` reaches (held open while looked
    up in the instances' connection gauges, which count it)."""
    gauge = ("peer_relay_connections", '{port="handshake",transport="ws"}')

    async def counts() -> list[float]:
        return [await trio.to_thread.run_sync(i.metric, *gauge) for i in cluster.instances]

    for _ in range(200):  # the previous connection's close may still be on its way
        if not any(await counts()):
            break
        await trio.sleep(0.05)
    else:
        raise AssertionError(f"handshake connections left open: {await counts()}")
    stream = await open_handshake(cluster, query)
    try:
        for _ in range(200):  # the relay counts it as soon as the upgrade is done
            now = await counts()
            if any(now):
                assert sorted(now) == [0] * (len(now) - 1) + [1], now
                return now.index(1)
            await trio.sleep(0.05)
        raise AssertionError(f"no instance counted the connection for {query!r}")
    finally:
        await stream.aclose()


async def test_one_nameplate_one_instance_and_no_nameplate_one_instance_too(cluster):
    with trio.fail_after(LIMIT):
        reached = {}
        for nameplate in (7, 417, 1000, 2345, 31337, 65535):
            query = f"?nameplate={nameplate}"
            reached[nameplate] = await instance_of(cluster, query)
            # Again, as the partner (or the same peer's room connection) would come.
            assert await instance_of(cluster, query) == reached[nameplate]
        assert len(set(reached.values())) > 1, reached  # spread, not all on one
        # No nameplate (bob-style codes): one fixed instance for all of them.
        alone = await instance_of(cluster, "")
        assert await instance_of(cluster, "") == alone
        assert await instance_of(cluster, "?other=1") == alone


async def transfers(cluster: Cluster, tmp_path: Path, nameplates: list[int], tag: str) -> None:
    """``PAIRS`` transfers at once through nginx, one per nameplate, all verified."""
    results = []

    async def one(nameplate: int) -> None:
        source = tmp_path / f"{tag}-{nameplate}.bin"
        source.write_bytes(os.urandom(20_000 + nameplate))
        results.append(await run_pair(cluster.address, f"{nameplate}-cluster-{tag}-pair", source,
                                      tmp_path / f"out-{tag}-{nameplate}", timeout=LIMIT))

    with trio.fail_after(LIMIT + 30):
        async with trio.open_nursery() as nursery:
            for nameplate in nameplates:
                nursery.start_soon(one, nameplate)
    failed = [f"{r.code}: {r.error}" for r in results if not r.ok]
    assert not failed and len(results) == len(nameplates), failed


async def test_twenty_pairs_spread_over_instances_and_survive_one_instance_dying(cluster, tmp_path):
    first = [101 + 37 * n for n in range(PAIRS)]
    await transfers(cluster, tmp_path, first, "before")
    rooms = await trio.to_thread.run_sync(cluster.rooms)
    assert sum(rooms) == PAIRS, rooms  # every pair met on one instance, in one room
    assert sum(1 for n in rooms if n) > 1, rooms  # and more than one instance served

    # The busiest instance dies without a word; its nameplates must move, both peers alike.
    victim = max(range(INSTANCES), key=lambda n: rooms[n])
    cluster.instances[victim].process.kill()
    cluster.instances[victim].process.wait(10)

    second = [nameplate + 1 for nameplate in first]  # fresh pairs, some on the dead one's part
    await transfers(cluster, tmp_path, first[:PAIRS // 2] + second[:PAIRS - PAIRS // 2], "after")
    after = await trio.to_thread.run_sync(cluster.rooms)
    survivors = [n for n in range(INSTANCES) if n != victim]
    assert sum(after[n] - rooms[n] for n in survivors) == PAIRS, (rooms, after)


def test_the_cluster_benchmark_runs_both_sides(tmp_path):
    """bench/cluster.py, tiny: both measurements and the summary lines (no figure asserted)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cluster.py"), "--pairs", "10",
         "--concurrency", "5", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=child_env())
    assert done.returncode == 0, done.stderr[-2000:]
    for line in ("1 instance :", "2 instances:", "median: 1 instance", "CPU per handshake"):
        assert line in done.stdout, f"{line!r} missing from:\n{done.stdout}"
    assert re.search(r"CPU s by instance \d+\.\d/\d+\.\d", done.stdout), done.stdout
