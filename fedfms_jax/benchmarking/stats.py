"""Wall-clock timing with warm-up excluded, summarised as median and spread."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each timed repetition (warm-up already excluded)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the repetitions."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "spread": self.spread,
            "samples_s": list(self.samples),
        }


def time_repeated(fn: Callable[[], object], *, warmup: int, repeats: int) -> Timing:
    """Call `fn` warmup times untimed, then `repeats` times timed.

    `fn` must itself wait for its results (block_until_ready / a torch call returns when done).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(tuple(samples))


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds`."""

    def __enter__(self) -> "Stopwatch":
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0


def time_alternating(fns: list[Callable[[], object]], *, warmup: int, repeats: list[int],
                     interleave: bool = True) -> list[Timing]:
    """Time several callables; with `interleave` their repetitions alternate (A, B, A, B...)
    so that each sees the same background load on a shared machine."""
    for i, fn in enumerate(fns):
        for w in range(warmup):
            progress(f"warm-up {w + 1}/{warmup} of part {i + 1}/{len(fns)}")
            fn()

    def once(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    samples: list[list[float]] = [[] for _ in fns]
    if interleave:
        for r in range(max(repeats)):
            for i, fn in enumerate(fns):
                if r < repeats[i]:
                    samples[i].append(once(fn))
                    progress(f"part {i + 1}/{len(fns)} repetition {r + 1}: {samples[i][-1]:.2f} s")
    else:
        for i, fn in enumerate(fns):
            for r in range(repeats[i]):
                samples[i].append(once(fn))
                progress(f"part {i + 1}/{len(fns)} repetition {r + 1}: {samples[i][-1]:.2f} s")
    return [Timing(tuple(s)) for s in samples]


def progress(message: str) -> None:
    """One timestamped line on stderr per phase, so a long run can be followed."""
    import sys

    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
