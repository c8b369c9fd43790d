"""Cost of the diagnostics on the CPU: metrics at log_interval 10 and the FP32 shadow at interval 10,
versus no diagnostics (docs/design.md §8).

    pytest benchmarks/test_bench_diagnostics.py --benchmark-only

Each benchmark round is one training step of an E5M2-quantized GPT (4L/4H/128, block 64, batch 8,
char vocabulary), as train.py runs it:
- `plain`: no diagnostics (rel_err stats off, no hooks);
- `hooks`: a step between logging steps with metrics on (the dead-neuron hooks run every step);
- `log`: a logging step with metrics on: rel_err stats, grad norms, the update tracker around
  optimizer.step(), quant_metrics, dead-neuron metrics and alerts;
- `shadow`: a step with the FP32 shadow's forward/backward and comparison.
Short rounds, their minimum and one intra-op thread (no OpenMP barrier stalls when other processes
share the cores) keep the numbers usable on a shared, busy machine. The last
benchmark's `extra_info` holds the overhead at interval 10 from the minima of the same session:
metrics@10 = (9 hooks + 1 log) / (10 plain) - 1, shadow@10 = (shadow - plain) / (10 plain).
"""

import pytest
import torch

from altgrad import metrics
from altgrad.model import GPT, GPTConfig
from altgrad.shadow import FP32ShadowModel
from altgrad.surgery import quantize_model
from train_step import train_step  # benchmarks/train_step.py

CFG = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
BATCH, INTERVAL = 8, 10
VARIANTS = ["plain", "hooks", "log", "shadow"]
_MIN: dict[str, float] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py


class Step:
    """One variant's model, optimizer, batch and diagnostics; calling it runs `train_step`."""

    def __init__(self, variant: str):
        torch.manual_seed(0)
        self.variant = variant
        self.model = quantize_model(GPT(CFG), "E5M2")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=6e-4)
        gen = torch.Generator().manual_seed(1)
        self.x, self.y = (torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=gen) for _ in range(2))
        metrics_on = variant in ("hooks", "log")
        self.tracker = metrics.UpdateTracker(self.model) if variant == "log" else None
        self.dead = metrics.DeadNeuronTracker(self.model, 1e-8, 100) if metrics_on else None
        self.shadow = FP32ShadowModel(self.model) if variant == "shadow" else None

    def __call__(self) -> dict:
        return train_step(self.model, self.opt, self.x, self.y, tracker=self.tracker, dead=self.dead,
                          shadow=self.shadow)[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_diagnostics_step(benchmark, variant):
    step = Step(variant)
    benchmark.group = "diagnostics: one E5M2 GPT step 4L/128 (cpu)"
    record = benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    _MIN[variant] = benchmark.stats.stats.min
    if set(VARIANTS) <= set(_MIN):
        plain = _MIN["plain"]
        for v in ("hooks", "log", "shadow"):  # one step's extra time over a plain step
            benchmark.extra_info[f"{v}_step_extra"] = _MIN[v] / plain - 1
        benchmark.extra_info["metrics@10_overhead"] = ((INTERVAL - 1) * _MIN["hooks"] + _MIN["log"]) / (INTERVAL * plain) - 1
        benchmark.extra_info["shadow@10_overhead"] = (_MIN["shadow"] - plain) / (INTERVAL * plain)
        print({k: f"{v:+.1%}" for k, v in benchmark.extra_info.items()})
    assert ("update/bit_stall" in record) == (variant == "log")
    assert ("shadow/grad_cos_mean" in record) == (variant == "shadow")
