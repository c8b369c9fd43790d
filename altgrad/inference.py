"""A trained run's model back from its checkpoint, and its loss on a split (train.py's evaluation).

    model, cfg, path, step = load_run_model("out/e5m2_fp8")          # newest readable checkpoint
    loss = mean_loss(model, cfg, "val", device="cpu")                 # what train.py logs as val/loss

`load_run_model` rebuilds the GPT from the checkpoint's own resolved config (model section, and
the quant section through `quantize_model`, so a quantized run evaluates and samples in its
formats), then loads the weights and the QuantizedLinear scaling state. `loss_sum` is the exact
computation train.py's evaluation runs (the same `eval_iters` batches drawn with the run's seed,
autocast as the run used it), so a checkpoint's `mean_loss` equals the val loss train.py logged at
that step, bit for bit, on the same device and versions.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch

from altgrad import checkpoint as ckpt
from altgrad.data import TokenBatches
from altgrad.model import GPT, GPTConfig
from altgrad.runconfig import RunConfig, build_quant_config, config_from_dict

__all__ = ["load_run_model", "autocast_for", "loss_sum", "mean_loss"]


def load_run_model(path: str | Path, device: str = "cpu", warn=None) -> tuple[GPT, RunConfig, Path, int]:
    """(model in eval mode on `device`, its RunConfig, the checkpoint file, its step).

    `path`: a run directory (its newest readable checkpoint, see checkpoint.load_latest_checkpoint)
    or a checkpoint file. Raises CheckpointError (one line) when there is nothing to load.
    """
    path = Path(path)
    if path.is_dir():
        ckpt_path, state = ckpt.load_latest_checkpoint(path, map_location="cpu", warn=warn)
        if state is None:
            raise ckpt.CheckpointError(f"{path}: no checkpoint (ckpt_last.pt or ckpt_<step>.pt) in this directory")
    else:
        ckpt_path, state = path, ckpt.load_checkpoint(path, map_location="cpu")
    if not isinstance(state.get("config"), dict) or "model" not in state:
        raise ckpt.CheckpointError(f"{ckpt_path}: not a train.py checkpoint (no config or model)")
    cfg = config_from_dict(state["config"])
    model = GPT(GPTConfig(**dataclasses.asdict(cfg.model)))
    quant_config = build_quant_config(cfg)
    if quant_config is not None:
        from altgrad.surgery import quantize_model

        quantize_model(model, config=quant_config)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, cfg, ckpt_path, int(state.get("step", 0))


def autocast_for(cfg: RunConfig, device: str):
    """train.py's autocast: train.dtype (auto = bf16 on CUDA, fp32 elsewhere)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    return nullcontext() if dtype == "fp32" else torch.autocast(device_type, dtype=torch.bfloat16)


@torch.no_grad()
def loss_sum(model, cfg: RunConfig, split: str = "val", device: str = "cpu", eval_iters: int | None = None,
             rank: int = 0, world_size: int = 1, data_dir: str | Path | None = None) -> torch.Tensor:
    """Sum over `eval_iters` (default train.eval_iters) batches of the mean token loss on `split`:
    the same batches at every call (a fresh loader seeded with train.seed + rank). A 0-d fp32
    tensor on `device`; the model is put in eval mode for the call and left as it was."""
    was_training = model.training
    model.eval()
    batches = TokenBatches(data_dir if data_dir is not None else cfg.data_dir, split, cfg.model.block_size,
                           cfg.train.batch_size, device, seed=cfg.train.seed, rank=rank, world_size=world_size)
    autocast = autocast_for(cfg, device)
    total = torch.zeros((), device=device)
    for _ in range(cfg.train.eval_iters if eval_iters is None else eval_iters):
        x, y = batches.next_batch()
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    model.train(was_training)
    return total


def mean_loss(model, cfg: RunConfig, split: str = "val", device: str = "cpu", eval_iters: int | None = None,
              data_dir: str | Path | None = None) -> float:
    """loss_sum / eval_iters as a float: what train.py logs as `val/loss`."""
    iters = cfg.train.eval_iters if eval_iters is None else eval_iters
    return (loss_sum(model, cfg, split, device, iters, data_dir=data_dir) / iters).item()
