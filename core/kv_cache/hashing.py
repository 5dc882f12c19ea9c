"""Prefix-cache block hashes: a chain over full blocks.

hash(block i) = H(hash(block i-1) || token ids of block i || extra keys). Because each hash covers
its parent, equal hashes mean equal prefixes, and a lookup can stop at the first miss. blake2b with
a 128-bit digest makes collisions (which would silently corrupt outputs) negligible, at a cost of
about a microsecond per 16-token block.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROOT_HASH = b"pagedserve-prefix-root"


def prefix_cache_key(*, cache_salt: str | None = None, lora_name: str | None = None) -> bytes:
    """The extra key of a request's block hashes: what, besides the tokens, decides whether two
    requests' KV is interchangeable. Each part is length-prefixed, so no two different
    (salt, adapter) pairs encode alike; a request with neither has the empty key."""
    key = b""
    for tag, value in ((b"s", cache_salt), (b"l", lora_name)):
        if value is not None:
            data = value.encode()
            key += tag + len(data).to_bytes(4, "little") + data
    return key


def hash_block(parent: bytes | None, token_ids: list[int], extra_key: bytes = b"") -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else ROOT_HASH)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra_key:
        h.update(extra_key)
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: list[int], block_size: int, extra_key: bytes = b""
) -> None:
    """Append the hashes of every full block of ``token_ids`` not yet hashed."""
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra_key))
