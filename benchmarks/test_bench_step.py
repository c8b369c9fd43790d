"""Quantized training step vs the fp32 step, `configs/cpu_quick.yaml` model, on the CPU.

    pytest benchmarks/test_bench_step.py --benchmark-only -s

One process builds the fp32 GPT (4 layers, 128 wide, block 64, batch 16, char vocabulary 65) and
one per format (E5M2, E4M3, E3M4, E7M0 on every role, delayed scaling, the layer's default
backend, rel_err off: train.py's steps between logging steps with metrics and shadow off), all from
the same initial weights, with AdamW as train.py. Each round times one optimizer step of every
model in an order that rotates every round; a round's ratio is format / fp32 in that round, and the
reported ratio is the median over rounds (min..max alongside). One intra-op thread: other
processes share the cores, and OpenMP barriers stall when a thread is descheduled.

With metrics (`test_cpu_quick_step_ratio_with_metrics`, `python benchmarks/test_bench_step.py
--metrics`), every model runs train.py's diagnostics with log_interval 10, fp32 included (the
dead-unit hooks every step; on every 10th step rel_err stats, gradient norms, the update tracker
around the optimizer step, quant and dead-unit metrics), and a round times 10 steps per model.
"""

import statistics
import sys
import time

import pytest
import torch

from altgrad import metrics
from altgrad.model import GPT, GPTConfig
from altgrad.surgery import quantize_model
from train_step import train_step  # benchmarks/train_step.py

CFG = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
BATCH, ROUNDS, WARMUP = 16, 9, 2
LOG_INTERVAL = 10
FORMATS = ["E5M2", "E4M3", "E3M4", "E7M0"]


def _run(fmt, with_metrics=False):
    torch.manual_seed(42)
    model = GPT(CFG)
    if fmt is not None:
        quantize_model(model, fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g),
                torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g)) for _ in range(4)]
    state = {"i": 0}
    tracker = metrics.UpdateTracker(model) if with_metrics else None
    dead = metrics.DeadNeuronTracker(model, 1e-8, 100) if with_metrics else None

    def one_step():
        x, y = batches[state["i"] % len(batches)]
        log = with_metrics and state["i"] % LOG_INTERVAL == 0
        state["i"] += 1
        return train_step(model, opt, x, y, tracker=tracker if log else None, dead=dead)[0]

    def step():  # a plain step, or with metrics the 10 steps of one logging interval
        for _ in range(LOG_INTERVAL if with_metrics else 1):
            loss = one_step()
        return loss

    return step


def interleaved_ratios(formats=FORMATS, rounds=ROUNDS, warmup=WARMUP, with_metrics=False) -> dict:
    names = ["fp32", *formats]
    steps = {n: _run(None if n == "fp32" else n, with_metrics) for n in names}
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    out = {"fp32_ms": statistics.median(times["fp32"]) * 1e3}
    for f in formats:
        ratios = [a / b for a, b in zip(times[f], times["fp32"])]
        out[f] = {"ms": statistics.median(times[f]) * 1e3, "ratio": statistics.median(ratios),
                  "min": min(ratios), "max": max(ratios)}
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py


def _print(result: dict, unit: str) -> None:
    print(f"\nfp32 {result['fp32_ms']:.1f} ms {unit}")
    for f in FORMATS:
        r = result[f]
        print(f"{f}: {r['ms']:.1f} ms {unit}, {r['ratio']:.2f}x fp32 ({r['min']:.2f}..{r['max']:.2f})")


def test_cpu_quick_step_ratio(benchmark):
    benchmark.group = "cpu_quick step, quantized / fp32 (1 thread)"
    result = benchmark.pedantic(interleaved_ratios, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    _print(result, "per step")


def test_cpu_quick_step_ratio_with_metrics(benchmark):
    benchmark.group = "cpu_quick 10 steps with metrics at log_interval 10, quantized / fp32 (1 thread)"
    result = benchmark.pedantic(interleaved_ratios, kwargs={"rounds": 5, "warmup": 1, "with_metrics": True},
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    _print(result, "per 10 steps")


if __name__ == "__main__":  # the same measurement without pytest (e.g. on an older checkout)
    torch.set_num_threads(1)
    if "--metrics" in sys.argv:
        print(interleaved_ratios(rounds=5, warmup=1, with_metrics=True))
    else:
        print(interleaved_ratios())
