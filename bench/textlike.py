"""Text-like data for the compression benchmarks: log lines made of wordlist words.

zstd level 1 shrinks it about 2.6x (real logs often shrink more), and it is generated, not
repeated, so no compressor can cheat with a long-range match on a repeated block.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (Path(__file__).resolve().parent.parent / "peer" / "words" / "eff_large.txt").read_text().split()[1::2]
LEVELS = ["INFO", "WARN", "DEBUG", "ERROR"]


def text_like(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    common, topics = WORDS[:2000], WORDS[:50]
    lines, total = [], 0
    while total < size:
        line = (
            f"2024-05-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
            f"{rng.randrange(60):02d} {rng.choice(LEVELS)} [{rng.choice(topics)}] "
            + " ".join(rng.choice(common) for _ in range(rng.randrange(3, 14)))
            + f" id={rng.randrange(10**6)}\n"
        )
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def write_text_like(path: Path, size: int, seed: int = 1) -> None:
    """Write `size` bytes in 64 MiB pieces, so a 1 GiB file does not need 1 GiB of memory twice."""
    step = 64 * 1024 * 1024
    with open(path, "wb") as out:
        for index, start in enumerate(range(0, size, step)):
            out.write(text_like(min(step, size - start), seed + index))
