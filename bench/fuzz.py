#!/usr/bin/env python3
"""Long fuzzing runs of the decoders that read bytes from strangers.

    python bench/fuzz.py [--target all|wire|frames|records|message|receiver|zstd] [--seconds 60]
                         [--engine mutate|atheris] [--seed N] [--crashes DIR]

Targets (the properties are in tests/fuzz_targets.py, shared with tests/test_fuzz.py):
  wire      relay.wire.Parser on any stream, cut anywhere
  frames    relay.frames.FrameReader (WebSocket frames after the upgrade), cut anywhere
  records   peer.records.Opener on sealed records with bits flipped or the stream cut
  message   peer.messages.decode_message on one record plaintext
  receiver  peer.transfer.ReceiverSession driven through a whole (mutated) transfer

Engines:
  mutate    (default, no extra package) starts from valid inputs of each target and applies
            random byte-level mutations (bit flips, interesting bytes, inserted, deleted and
            duplicated ranges, splices of two inputs), plus record-level ones for the receiver
  atheris   coverage-guided libFuzzer through atheris (pip install atheris), one child
            process per target; its corpus starts from the same valid inputs

Any failing input is written to --crashes (default ./fuzz-crashes) and the run exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff", b"\x7f\xff", b"\x80\x00",
               b"0", b"f", b"F", b"g", b"\n", b"PACK", b"0000", b"000001", b"\x00\x00\x00\x00"]


def mutate(data: bytes, others: list[bytes], rng: random.Random) -> bytes:
    """One to eight random byte-level edits of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.randrange(7)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            at = min(at, len(out) - 1)
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at:at] = rng.choice(INTERESTING)
        elif kind == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3 and out:
            del out[at : at + rng.randint(1, 32)]
        elif kind == 4 and out:
            end = min(len(out), at + rng.randint(1, 64))
            out[end:end] = out[at:end]
        elif kind == 5:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            out = out[:at] + bytearray(other[cut:])
        elif kind == 6 and out:
            at = min(at, len(out) - 1)
            out[at] = rng.randrange(256)
    return bytes(out)


def receiver_mutation(rng: random.Random, corpus: list[bytes]) -> bytes:
    """A whole transfer with records dropped, repeated, swapped, cut, flipped or forged."""
    import fuzz_targets as targets

    records = targets.records_from(rng.choice(corpus)[1:])
    return b"\x00" + targets.records_to(targets.mutate_records(records, rng, rng.randint(1, 5)))


def save_crash(crashes: Path, name: str, data: bytes, error: BaseException) -> Path:
    crashes.mkdir(parents=True, exist_ok=True)
    path = crashes / f"{name}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text("".join(traceback.format_exception(error)))
    return path


def run_mutate(name: str, seconds: float, seed: int, crashes: Path) -> tuple[int, int]:
    """Fuzz one target for ``seconds``; return (inputs tried, failures)."""
    import fuzz_targets as targets

    one_input, make_seeds = targets.TARGETS[name]
    corpus = make_seeds()
    rng = random.Random(seed)
    tried = failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(100):
            if name == "receiver" and rng.random() < 0.5:
                data = receiver_mutation(rng, corpus)
            else:
                data = mutate(rng.choice(corpus), corpus, rng)
            tried += 1
            try:
                one_input(data)
            except Exception as error:  # noqa: BLE001 - every escape is a finding
                failures += 1
                path = save_crash(crashes, name, data, error)
                print(f"  {name}: {type(error).__name__}: {error} -> {path}", file=sys.stderr)
            if len(corpus) < 2000 and rng.random() < 0.01:
                corpus.append(data)  # keep a few mutants: deeper edits over time
    return tried, failures


def run_atheris_child(name: str) -> None:
    """Inside a child process: hand the target to libFuzzer (never returns)."""
    import atheris

    with atheris.instrument_imports():
        import fuzz_targets as targets
        import peer.messages  # noqa: F401 - instrumented for coverage
        import peer.offer  # noqa: F401
        import peer.records  # noqa: F401
        import peer.transfer  # noqa: F401
        import relay.wire  # noqa: F401
    one_input = targets.TARGETS[name][0]
    atheris.Setup(sys.argv[:1] + sys.argv[3:], one_input)
    atheris.Fuzz()


def run_atheris(name: str, seconds: float, seed: int, crashes: Path) -> tuple[int, int]:
    import fuzz_targets as targets

    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for i, data in enumerate(targets.seeds(name)):
        (corpus / f"seed{i}").write_bytes(data)
    crashes.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--atheris-child", name,
               f"-max_total_time={int(seconds)}", f"-seed={seed}", "-print_final_stats=1",
               f"-artifact_prefix={crashes}/{name}-", str(corpus)]
    result = subprocess.run(command, capture_output=True, text=True)
    tried = 0
    for line in result.stderr.splitlines():
        if line.startswith("stat::number_of_executed_units:"):
            tried = int(line.split(":")[-1])
    if result.returncode:
        print(result.stderr[-3000:], file=sys.stderr)
    return tried, 0 if result.returncode == 0 else 1


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--atheris-child":
        run_atheris_child(sys.argv[2])
        return
    import fuzz_targets as targets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="all", choices=["all", *sorted(targets.TARGETS)])
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--engine", default="mutate", choices=["mutate", "atheris"])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    args = parser.parse_args()
    if args.engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError:
            sys.exit("atheris is not installed: pip install atheris (or use --engine mutate)")
    names = sorted(targets.TARGETS) if args.target == "all" else [args.target]
    run = run_atheris if args.engine == "atheris" else run_mutate
    total_failures = 0
    print(f"engine {args.engine}, seed {args.seed}, {args.seconds:.0f} s per target, "
          f"Python {sys.version.split()[0]}")
    for name in names:
        started = time.monotonic()
        tried, failures = run(name, args.seconds, args.seed, args.crashes)
        elapsed = time.monotonic() - started
        total_failures += failures
        print(f"{name:9} {tried:>10} inputs  {tried / elapsed:>8.0f}/s  failures {failures}")
    sys.exit(1 if total_failures else 0)


if __name__ == "__main__":
    main()
