"""The one clock the CUDA benchmarks share: device time from `triton.testing.do_bench`, and
pytest-benchmark's wall-clock columns for a synchronised call."""

import torch
import triton.testing


def device_ms(fn, rep: int = 100) -> float:
    """Median device time of fn() in ms (CUDA events, L2 flushed between calls), after one untimed
    call; `rep` is do_bench's target measuring time in ms."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def wall(benchmark, fn, rounds: int = 20) -> None:
    """pytest-benchmark's own columns for fn(): wall clock per synchronised call, launch overhead
    included."""
    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2, iterations=1)
