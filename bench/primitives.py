"""One core's throughput for the primitives a transfer spends its CPU on.

    python bench/primitives.py

AES-256-GCM sealing of 32 KiB records (our record size, OpenSSL through ``cryptography``)
and the integrity hashes (blake3, which we use, and SHA-256 for comparison), each over
256 MiB of random bytes in this one thread. These bound what one peer process can do.
"""

from __future__ import annotations

import hashlib
import os
import time

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

RECORD = 32 * 1024
TOTAL = 256 << 20


def _rate(work, total: int = TOTAL) -> float:
    """MiB/s of ``work`` over ``total`` bytes, best of three (the least disturbed)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return total / best / 2**20


def measure() -> dict[str, float]:
    block = os.urandom(RECORD)
    records = TOTAL // RECORD
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)

    def seal() -> None:
        for _ in range(records):
            aead.encrypt(nonce, block, None)

    sealed = aead.encrypt(nonce, block, None)

    def open_() -> None:
        for _ in range(records):
            aead.decrypt(nonce, sealed, None)

    big = os.urandom(1 << 20)

    def hasher(factory):
        def run() -> None:
            h = factory()
            for _ in range(TOTAL >> 20):
                h.update(big)
            h.digest()
        return run

    return {
        "aes256gcm_seal": _rate(seal),
        "aes256gcm_open": _rate(open_),
        "blake3": _rate(hasher(blake3.blake3)),
        "sha256": _rate(hasher(hashlib.sha256)),
    }


def main() -> None:
    for name, rate in measure().items():
        print(f"{name:16} {rate:8.0f} MiB/s")


if __name__ == "__main__":
    main()
