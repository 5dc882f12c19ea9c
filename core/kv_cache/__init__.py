"""KV-cache bookkeeping of the engine core: block pool, prefix hashing, per-request block lists."""
