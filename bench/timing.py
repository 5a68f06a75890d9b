"""Wall-clock timing shared by the benchmark scripts.

Two implementations of the same work are timed interleaved (A, B, A, B, ...), so slow phases of a shared machine hit
both sides alike; each side gets one untimed first call (for JAX: the compilation) reported apart. Every report
records the machine's load average and thread settings before and after the runs, and warns when the load average
exceeds the number of cores: a ratio measured then says more about the load than about the code.

    state = machine_state()          # before
    timing = interleaved({"jax": run_jax, "diffusers": run_torch}, repeats=7)
    print(timing.line("jax")); print(timing.ratio_line("diffusers", "jax"))
    report_machine(state)            # prints before/after and the load warning
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Callable

THREAD_VARIABLES = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def machine_state() -> dict:
    """Load average (1, 5, 15 min), core count and the thread settings of both frameworks, at this moment."""
    state = {"load": os.getloadavg(), "cores": os.cpu_count()}
    if "torch" in sys.modules:
        state["torch_threads"] = sys.modules["torch"].get_num_threads()
    state.update({name: os.environ.get(name, "-") for name in THREAD_VARIABLES})
    return state


def describe(state: dict) -> str:
    load = "/".join(f"{value:.2f}" for value in state["load"])
    settings = " ".join(f"{key}={value}" for key, value in state.items() if key not in ("load", "cores"))
    return f"load {load} on {state['cores']} cores; {settings}"


def report_machine(before: dict) -> list[str]:
    """Print the machine state before (given) and now; warn when either 1-minute load average exceeds the cores."""
    after = machine_state()
    print(f"machine before: {describe(before)}")
    print(f"machine after:  {describe(after)}")
    busiest = max(before["load"][0], after["load"][0])
    if busiest > after["cores"]:
        print(f"WARNING: load average {busiest:.2f} exceeds the {after['cores']} cores: other processes shared the "
              "machine, the times and ratios are unreliable")
    return [describe(before), describe(after)]


def relative_spread(values) -> float:
    """(max - min) / median: 0 when every repeat agrees."""
    return (max(values) - min(values)) / statistics.median(values)


@dataclasses.dataclass
class Timing:
    """Per-side first-call seconds (compilation for jitted functions) and steady-state seconds of every repeat."""

    first: dict[str, float]
    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def line(self, name: str) -> str:
        return (f"{name}: first call {self.first[name]:.2f} s; steady state median {1e3 * self.median(name):.1f} ms, "
                f"spread {relative_spread(self.times[name]):.2f} over {len(self.times[name])} repeats")

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        """Per-repeat ratios of the two sides' times (each pair ran back to back)."""
        return [a / b for a, b in zip(self.times[numerator], self.times[denominator])]

    def ratio(self, numerator: str, denominator: str) -> tuple[float, float]:
        """Median of the per-repeat ratios and their relative spread."""
        ratios = self.ratios(numerator, denominator)
        return statistics.median(ratios), relative_spread(ratios)


def interleaved(functions: dict[str, Callable[[], object]], repeats: int) -> Timing:
    """Call each function once untimed (its first-call time recorded), then `repeats` rounds of one call of each, in
    order. Functions must block until their result is ready."""
    first, times = {}, {name: [] for name in functions}
    for name, fn in functions.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return Timing(first, times)
