"""FP32 shadow model: how faithful are the quantized model's gradients? (docs/design.md §8)

`FP32ShadowModel(model)` keeps an unquantized float32 copy of the model. `compare(model, batches,
grad_accum)` copies the current weights into it, runs forward/backward on the same micro-batches
the training step used (loss / grad_accum, as train.py accumulates), and compares each layer's
gradient g (the trained model's `.grad`) with the shadow's g_ref:

    shadow/<layer>/grad_cos     = <g, g_ref> / (|g| |g_ref|)
    shadow/<layer>/grad_snr_db  = 10 log10(|g_ref|^2 / |g - g_ref|^2), clamped to ±200 dB
    shadow/grad_cos_mean, shadow/grad_snr_db_mean  (means over layers), perf/shadow_ms

Call it after the step's backward and before gradient clipping and `optimizer.step()` (clipping
rescales g and would shift the SNR). Layers are the modules that own parameters (a layer's
weight and bias gradients are one vector), named as `metrics.layer_parameters` names them.

The shadow runs without autocast, with TF32 switched off for its matmuls and convolutions
(`true_fp32`, whatever the caller enabled: nanoGPT turns TF32 on globally), and with its own RNG stream (the training RNG is restored
afterwards, so enabling the shadow does not change the run). With dropout > 0 its dropout masks
differ from the model's, so compare at dropout 0 (the default configs) for a clean reading.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time

import torch
from torch import nn

from altgrad.metrics import layer_parameters, to_host
from altgrad.surgery import dequantize_model

__all__ = ["FP32ShadowModel", "SNR_CAP_DB", "true_fp32"]

SNR_CAP_DB = 200.0  # identical gradients have infinite SNR; a finite cap keeps logs plottable


@contextlib.contextmanager
def true_fp32():
    """fp32 matmuls and convolutions in IEEE fp32, not TF32, inside the block (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _dequantize(model: nn.Module) -> nn.Module:
    """model with every QuantizedLinear swapped back for its wrapped nn.Linear."""
    return dequantize_model(model)


def _strip_hooks(model: nn.Module) -> None:
    # deepcopy copies forward hooks (e.g. a DeadNeuronTracker's); the shadow must not feed them
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, attr, None)
            if hooks is not None:
                hooks.clear()


class FP32ShadowModel:
    """An unquantized float32 copy of `model`, kept in step with it by `compare`."""

    def __init__(self, model: nn.Module):
        model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: copy the real module
        memo: dict = {}
        shadow = copy.deepcopy(model, memo)
        # the deepcopy memo maps each original tensor to its copy: a pairing independent of names,
        # which differ between a QuantizedLinear (x.linear.weight) and the plain nn.Linear
        self._pairs = {id(p): memo[id(p)] for p in model.parameters() if id(p) in memo}
        self._buffer_pairs = {id(b): memo[id(b)] for b in model.buffers() if id(b) in memo}
        shadow = _dequantize(shadow)
        _strip_hooks(shadow)
        for t in list(shadow.parameters()) + list(shadow.buffers()):
            if t.is_floating_point():
                t.data = t.data.float()  # in place on the same object, so the pairing holds
        self.shadow = shadow
        # keep only tensors the dequantized copy still holds (a QuantizedLinear's scale buffers go)
        kept = {id(t) for t in list(shadow.parameters()) + list(shadow.buffers())}
        self._pairs = {k: p for k, p in self._pairs.items() if id(p) in kept}
        self._buffer_pairs = {k: b for k, b in self._buffer_pairs.items() if id(b) in kept}

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Copy the model's current parameters and floating buffers into the shadow."""
        model = getattr(model, "_orig_mod", model)
        for p in model.parameters():
            if id(p) in self._pairs:
                self._pairs[id(p)].copy_(p.detach())
        for b in model.buffers():
            ref = self._buffer_pairs.get(id(b))
            if ref is not None and ref.shape == b.shape:
                ref.copy_(b.detach())

    def _backward(self, batches, grad_accum: int, training: bool) -> None:
        """FP32 forward/backward on the micro-batches, without disturbing the training RNG."""
        shadow = self.shadow
        shadow.train(training)
        shadow.zero_grad(set_to_none=True)
        device = next(shadow.parameters()).device
        cuda = [] if device.type != "cuda" else [device.index if device.index is not None else torch.cuda.current_device()]
        rng = torch.random.fork_rng(devices=cuda)
        with rng, torch.autocast(device.type, enabled=False), true_fp32(), torch.enable_grad():
            for x, y in batches:
                _, loss = shadow(x, y)
                (loss.float() / grad_accum).backward()

    def compare(self, model: nn.Module, batches, grad_accum: int = 1) -> dict[str, float]:
        """Per-layer gradient cosine and SNR of `model`'s current `.grad`s against the FP32 shadow's."""
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1 (got {grad_accum!r})")
        batches = list(batches)
        if not batches:
            raise ValueError("batches must hold at least one (x, y) micro-batch")
        t0 = time.perf_counter()
        model = getattr(model, "_orig_mod", model)
        self.sync(model)
        self._backward(batches, grad_accum, model.training)
        names, tensors = [], []
        for name, params in layer_parameters(model):
            pairs = [(p.grad, self._pairs[id(p)].grad) for p in params if id(p) in self._pairs]
            if not pairs or any(g is None or r is None for g, r in pairs):
                continue  # a layer without gradients this step (unused, or frozen)
            g = torch.cat([g.detach().double().reshape(-1) for g, _ in pairs])
            r = torch.cat([r.detach().double().reshape(-1).to(g.device) for _, r in pairs])
            names.append(name)
            tensors += [torch.dot(g, r), torch.dot(g, g), torch.dot(r, r), torch.dot(g - r, g - r)]
        host = to_host(tensors)  # the one host sync, which also ends the timed GPU work
        self.shadow.zero_grad(set_to_none=True)  # free the shadow's gradient memory between uses
        out = {}
        for i, name in enumerate(names):
            dot, gg, rr, ee = host[4 * i: 4 * i + 4]
            out[f"shadow/{name}/grad_cos"] = _cosine(dot, gg, rr)
            out[f"shadow/{name}/grad_snr_db"] = _snr_db(rr, ee)
        if names:
            out["shadow/grad_cos_mean"] = sum(out[f"shadow/{n}/grad_cos"] for n in names) / len(names)
            out["shadow/grad_snr_db_mean"] = sum(out[f"shadow/{n}/grad_snr_db"] for n in names) / len(names)
        out["perf/shadow_ms"] = (time.perf_counter() - t0) * 1e3
        return out


def _cosine(dot: float, gg: float, rr: float) -> float:
    if gg == 0 and rr == 0:
        return 1.0  # both zero: the quantized gradient is exactly right
    if gg == 0 or rr == 0:
        return 0.0
    return dot / math.sqrt(gg * rr)


def _snr_db(ref_energy: float, err_energy: float) -> float:
    if err_energy == 0:
        return SNR_CAP_DB
    if ref_energy == 0:
        return -SNR_CAP_DB
    return max(-SNR_CAP_DB, min(SNR_CAP_DB, 10.0 * math.log10(ref_energy / err_energy)))
