"""The periodic engine stats line, as vLLM's LoggingStatLogger prints it:

``Avg prompt throughput: 812.3 tokens/s, Avg generation throughput: 95.1 tokens/s, Running: 4 reqs,
Waiting: 0 reqs, GPU KV cache usage: 12.5%, Prefix cache hit rate: 40.0%, Preemptions: 0``

It is fed the engine's per-step SchedulerStats (counters arrive as deltas, gauges are absolute)
and logs from the frontend process. A line covers the time since the previous one and appears
only when that interval had work: tokens computed, a preemption, or requests running or waiting.
An idle stretch is skipped in whole intervals, so it dilutes the next line's throughput by less
than one interval.

Under AsyncLLM (the server) a timer on the event loop also logs the interval in which the engine
goes idle, although no stats follow it; then the logger is silent until the next request. The
offline LLM logs only from its own steps, as vLLM's does: the tail of a generate() call shorter
than an interval is reported in the next call's first line.

The prefix-cache hit rate is over the prompt tokens looked up in the interval; an interval
without look-ups (decode only) repeats the rate of the last one that had some.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ipc.messages import SchedulerStats

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoggingStatLogger:
    interval_s: float  # EngineArgs.log_stats_interval
    clock: Callable[[], float] = time.monotonic
    # Counters since the last line.
    prompt_tokens: int = field(default=0, init=False)
    generation_tokens: int = field(default=0, init=False)
    preemptions: int = field(default=0, init=False)
    prefix_queries: int = field(default=0, init=False)
    prefix_hits: int = field(default=0, init=False)
    # Gauges, from the latest stats.
    running: int = field(default=0, init=False)
    waiting: int = field(default=0, init=False)
    kv_cache_usage: float = field(default=0.0, init=False)
    last_hit_rate: float = field(default=0.0, init=False)
    last_log_time: float = field(init=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"log_stats_interval must be positive, got {self.interval_s}")
        self.last_log_time = self.clock()

    @property
    def has_work(self) -> bool:
        """Whether the interval since the last line has anything to report."""
        return bool(
            self.prompt_tokens or self.generation_tokens or self.preemptions or self.running or self.waiting
        )

    def record(self, stats: SchedulerStats) -> bool:
        """Add one step's stats; logs (and returns True) when an interval has passed."""
        now = self.clock()
        if not self.has_work:
            # Idle since the last line: start this interval at the last whole-interval boundary.
            idle_intervals = (now - self.last_log_time) // self.interval_s
            self.last_log_time += idle_intervals * self.interval_s
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.preemptions += stats.num_preemptions
        self.prefix_queries += stats.prefix_cache_queries
        self.prefix_hits += stats.prefix_cache_hits
        self.running, self.waiting = stats.num_running_reqs, stats.num_waiting_reqs
        self.kv_cache_usage = stats.kv_cache_usage
        if now - self.last_log_time >= self.interval_s:
            self.log(now)
            return True
        return False

    def record_on_loop(self, stats: SchedulerStats) -> None:
        """The AsyncLLM stats listener (it runs on the event loop): record, and keep a timer for
        the end of the current interval, so that the interval in which the engine goes idle is
        logged although no further stats arrive. No timer is kept while idle."""
        if self.record(stats) and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and self.has_work:
            delay = max(0.0, self.last_log_time + self.interval_s - self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.log(self.clock())

    def log(self, now: float) -> None:
        """Log the line for the interval ending at ``now`` (if it had work) and start the next."""
        elapsed = now - self.last_log_time
        if self.prefix_queries:
            self.last_hit_rate = self.prefix_hits / self.prefix_queries
        if self.has_work and elapsed > 0:
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                "Running: %d reqs, Waiting: %d reqs, GPU KV cache usage: %.1f%%, "
                "Prefix cache hit rate: %.1f%%, Preemptions: %d",
                self.prompt_tokens / elapsed,
                self.generation_tokens / elapsed,
                self.running,
                self.waiting,
                self.kv_cache_usage * 100.0,
                self.last_hit_rate * 100.0,
                self.preemptions,
            )
        self.last_log_time = now
        self.prompt_tokens = self.generation_tokens = self.preemptions = 0
        self.prefix_queries = self.prefix_hits = 0
