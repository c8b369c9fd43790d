"""train.py's optimizer step, reduced to what the diagnostics touch: the step the CPU benchmarks
time (test_bench_step.py, test_bench_diagnostics.py)."""

import torch

from altgrad import metrics
from altgrad.linear import set_stats_level


def train_step(model, opt, x, y, *, tracker=None, dead=None, shadow=None) -> tuple[torch.Tensor, dict]:
    """One optimizer step of `model` on the batch (x, y), as train.py runs it: forward, backward,
    the FP32 shadow's comparison (with `shadow`), gradient clipping at norm 1, `opt.step()`, the
    dead-unit hooks (with `dead`). With an update `tracker` it is a logging step: "full" stats,
    gradient norms, the tracker around `opt.step()`, quant and dead-unit metrics and alerts
    (`dead` is then required). Returns (loss, the step's metrics record)."""
    record, log = {}, tracker is not None
    set_stats_level(model, "full" if log else "scale")
    _, loss = model(x, y)
    loss.backward()
    if shadow is not None:
        record.update(shadow.compare(model, [(x, y)], 1))
    if log:
        record.update(metrics.grad_norms(model))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if log:
        tracker.before_step()
    opt.step()
    if log:
        record.update(tracker.after_step())
    opt.zero_grad(set_to_none=True)
    if dead is not None:
        dead.step()
    if log:
        record.update(metrics.quant_metrics(model))
        record.update(dead.metrics())
        metrics.alerts(record, 0.01, 0.5)
    return loss, record
