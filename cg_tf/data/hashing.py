"""Stable hashing: every random choice of the project derives from these.

A value depends only on (seed, key, purpose), never on a global RNG, Python's
salted `hash()`, the runner, the worker count or the order of processing, so
a dataset built twice (or on two runners) is identical.
"""

import hashlib

_SCALE = float(2**64)


def stable_hash64(seed: int, key: str | bytes, purpose: str) -> int:
    """A 64-bit unsigned integer determined by (seed, key, purpose)."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    h = hashlib.blake2b(digest_size=8, person=b"cg_tf-v1")
    h.update(f"{int(seed)}\x00{purpose}\x00".encode("utf-8"))
    h.update(key)
    return int.from_bytes(h.digest(), "little")


def stable_uniform(seed: int, key: str | bytes, purpose: str) -> float:
    """A float in [0, 1), uniform over keys, determined by (seed, key, purpose)."""
    return stable_hash64(seed, key, purpose) / _SCALE


def stable_randint(seed: int, key: str | bytes, purpose: str, n: int) -> int:
    """An integer in [0, n), determined by (seed, key, purpose)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return stable_hash64(seed, key, purpose) % n
