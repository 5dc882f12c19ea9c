"""Micro-benchmark of the shared-memory broadcast ring: one writer, two readers, separate processes.

Latency is the time from just before ``enqueue_frames`` to the moment the *slower* of the two readers
has its private copy (``dequeue_frames`` returned). The sender stamps ``time.perf_counter()`` in the
message (CLOCK_MONOTONIC on Linux, the same clock in every process); each reader subtracts it on
arrival. Messages are sent one at a time (the writer waits until both readers have read) so queueing
does not inflate the figure.

Cases:
  small-hot        ~200 B, back to back: readers are spinning (the loaded engine case)
  large-hot        ~1 MB in a 1 MiB slot (inline path)
  large-overflow   ~1 MB in a 64 KiB slot (overflow segment path)
  small-idle       ~200 B after a pause longer than the readers' spin window: they are blocked
                   and the writer's notification wakes them (the idle engine case)
  *-stream         throughput: messages streamed without waiting, until both readers drained
  small-hot-1reader  reference: small-hot with one reader (on a 2-core box, a writer and two
                   spinning readers oversubscribe the CPUs and the scheduler dominates)

Usage: python benchmarks/ring_bench.py [--out benchmarks/results/ring_<host>.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import numpy as np
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import cpu_bench_record, save_json  # noqa: E402
from ipc.shm_ring import RingClosed, RingHandle, ShmRingReader, ShmRingWriter  # noqa: E402

_STAMP = struct.Struct("<dII")  # send time, case id, sequence number
WARMUP_CASE = 0


@dataclass(slots=True)
class Case:
    name: str
    case_id: int
    msg_bytes: int
    n: int
    gap_s: float = 0.0  # pause before each message (idle case)
    stream: bool = False


@dataclass(slots=True)
class CaseResult:
    name: str
    n_readers: int
    msg_bytes: int
    slot_bytes: int
    path: str
    repeats: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


def _reader_main(handle: RingHandle, rank: int, spin_s: float, out: Any) -> None:
    """Record (case, seq, latency) for every message until the writer closes the ring."""
    reader = ShmRingReader(handle, rank, spin_s=spin_s)
    records: list[tuple[int, int, float]] = []
    try:
        while True:
            frames = reader.dequeue_frames(timeout=120)
            now = time.perf_counter()
            sent, case_id, seq = _STAMP.unpack_from(frames[0], 0)
            records.append((case_id, seq, now - sent))
    except RingClosed:
        pass
    finally:
        reader.close()
    out.put((rank, records))


def _message(msg_bytes: int, case_id: int, seq: int, body: bytes) -> list[Any]:
    return [_STAMP.pack(time.perf_counter(), case_id, seq), body]


def _run_ring(
    n_readers: int, slot_bytes: int, n_slots: int, spin_s: float, cases: list[Case], repeats: int, warmup: int
) -> tuple[dict[int, dict[int, list[tuple[int, float]]]], dict[int, float]]:
    """Run cases on one ring; returns ({case key: {rank: [(seq, latency)]}}, {case key: elapsed s})."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    writer = ShmRingWriter(n_readers, n_slots=n_slots, slot_bytes=slot_bytes, spin_s=spin_s)
    procs = [ctx.Process(target=_reader_main, args=(writer.handle, r, spin_s, out)) for r in range(n_readers)]
    for p in procs:
        p.start()
    elapsed: dict[int, float] = {}
    try:
        writer.wait_for_readers(60)
        for case in cases:
            body = bytes(case.msg_bytes - _STAMP.size)
            for _ in range(warmup if not case.gap_s else 3):
                writer.enqueue_frames(_message(case.msg_bytes, WARMUP_CASE, 0, body), timeout=60)
                writer.wait_drained(60)
            for rep in range(repeats):
                case_key = case.case_id * 100 + rep
                start = time.perf_counter()
                for seq in range(case.n):
                    if case.gap_s:
                        time.sleep(case.gap_s)
                    writer.enqueue_frames(_message(case.msg_bytes, case_key, seq, body), timeout=60)
                    if not case.stream:
                        writer.wait_drained(60)
                writer.wait_drained(60)
                elapsed[case_key] = time.perf_counter() - start
        writer.close(drain_timeout=60)
        gathered: dict[int, dict[int, list[tuple[int, float]]]] = {}
        for _ in procs:
            rank, records = out.get(timeout=120)
            for case_id, seq, lat in records:
                gathered.setdefault(case_id, {}).setdefault(rank, []).append((seq, lat))
        for p in procs:
            p.join(60)
        return gathered, elapsed
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        writer.close()


def _latencies(per_rank: dict[int, list[tuple[int, float]]]) -> np.ndarray:
    """Per message, the latest of the readers (every reader must have read it)."""
    by_rank = [dict(records) for _, records in sorted(per_rank.items())]
    assert all(r.keys() == by_rank[0].keys() for r in by_rank), "readers saw different messages"
    return np.array([max(r[seq] for r in by_rank) for seq in sorted(by_rank[0])]) * 1e6


def _stats(us: np.ndarray) -> dict[str, float]:
    return {
        "n": float(us.size),
        "p50_us": float(np.percentile(us, 50)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "max_us": float(us.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", f"ring_{socket.gethostname()}.json")
    )
    parser.add_argument("--n", type=int, default=2000, help="messages per repeat (hot cases)")
    parser.add_argument("--n-large", type=int, default=300, help="messages per repeat (1 MB cases)")
    parser.add_argument("--n-idle", type=int, default=30, help="messages per repeat (idle case)")
    parser.add_argument("--n-stream", type=int, default=20000, help="messages per repeat (small stream)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--small-bytes", type=int, default=200)
    parser.add_argument("--large-bytes", type=int, default=1_000_000)
    parser.add_argument("--n-slots", type=int, default=8)
    parser.add_argument("--spin-s", type=float, default=0.05, help="reader/writer spin window")
    args = parser.parse_args()

    small, large = args.small_bytes, args.large_bytes
    big_slot, small_slot = 1 << 20, 64 << 10
    # (readers, slot bytes, cases). The one-reader ring is a reference: with a writer and two
    # spinning readers, a 2-core box is oversubscribed and latency measures the scheduler.
    rings = [
        (
            2,
            big_slot,
            [
                Case("small-hot", 1, small, args.n),
                Case("large-hot", 2, large, args.n_large),
                Case("small-idle", 3, small, args.n_idle, gap_s=2 * args.spin_s + 0.02),
                Case("small-stream", 4, small, args.n_stream, stream=True),
                Case("large-stream", 5, large, args.n_large, stream=True),
            ],
        ),
        (2, small_slot, [Case("large-overflow", 6, large, args.n_large)]),
        (1, big_slot, [Case("small-hot-1reader", 7, small, args.n)]),
    ]

    load_before = os.getloadavg()
    results: list[CaseResult] = []
    for n_readers, slot_bytes, cases in rings:
        gathered, elapsed_by_key = _run_ring(
            n_readers, slot_bytes, args.n_slots, args.spin_s, cases, args.repeats, args.warmup
        )
        for case in cases:
            path = "inline" if case.msg_bytes + 64 <= slot_bytes else "overflow"
            res = CaseResult(case.name, n_readers, case.msg_bytes, slot_bytes, path)
            all_us = []
            for rep in range(args.repeats):
                key = case.case_id * 100 + rep
                elapsed = elapsed_by_key[key]
                if case.stream:
                    res.repeats.append(
                        {
                            "msgs_per_s": case.n / elapsed,
                            "MB_per_s": case.n * case.msg_bytes / elapsed / 1e6,
                            "elapsed_s": elapsed,
                        }
                    )
                else:
                    us = _latencies(gathered[key])
                    assert us.size == case.n
                    all_us.append(us)
                    res.repeats.append(_stats(us))
            if case.stream:
                res.summary = {k: float(np.median([r[k] for r in res.repeats])) for k in res.repeats[0]}
            else:
                res.summary = _stats(np.concatenate(all_us))
            results.append(res)

    report = cpu_bench_record(
        "ring_bench",
        "shm broadcast ring, 1 writer + 2 reader processes; latency = enqueue to both readers done",
        load_before[0],
        {
            "msgspec": msgspec.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "numpy": np.__version__,
        },
        vars(args),
        [asdict(r) for r in results],
    )
    save_json(args.out, report)

    dev = report["device"]
    print(
        f"ring_bench on {dev['cpu_model']} ({dev['usable_cpus']} usable CPUs, load "
        f"{dev['loadavg_1m_before']:.1f} -> {dev['loadavg_1m_after']:.1f})"
    )
    print(
        f"{'case':<18}{'readers':>8}{'bytes':>10}{'slot':>9}  {'path':<9}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}{'max us':>10}   throughput"
    )
    for r in results:
        s = r.summary
        if "msgs_per_s" in s:
            print(
                f"{r.name:<18}{r.n_readers:>8}{r.msg_bytes:>10}{r.slot_bytes:>9}  {r.path:<9}{'':>37}   "
                f"{s['msgs_per_s']:,.0f} msg/s, {s['MB_per_s']:,.0f} MB/s"
            )
        else:
            print(
                f"{r.name:<18}{r.n_readers:>8}{r.msg_bytes:>10}{r.slot_bytes:>9}  {r.path:<9}"
                f"{s['p50_us']:>9.1f}{s['p90_us']:>9.1f}{s['p99_us']:>9.1f}{s['max_us']:>10.1f}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
