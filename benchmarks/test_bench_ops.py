"""Eager bookkeeping of one QuantizedLinear forward+backward: ops dispatched per call.

    pytest benchmarks/test_bench_ops.py --benchmark-only

A TorchDispatchMode records every op that reaches the dispatcher during `y = layer(x);
y.backward(dy)` in steady state (delayed scaling, histories filled, rel_err off), against a plain
nn.Linear. `top` counts what the layer dispatches (each altgrad custom op is one entry; views
counted separately), `inside` the aten ops that altgrad's custom ops run in their eager CPU
implementations (on CUDA each cast is one Triton launch plus the scale bookkeeping). The timing is
one fwd+bwd, reported next to nn.Linear's in the same group.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from altgrad.linear import QuantizedLinear
from altgrad.surgery import quantize_model

M, IN, OUT = 1024, 128, 512
OP_BUDGET = 15  # non-view ops per QuantizedLinear forward+backward


def _is_view(func) -> bool:
    return bool(getattr(func, "is_view", False)) or func.__name__.split(".")[0] in ("view", "t", "transpose",
                                                                                    "detach", "alias", "slice",
                                                                                    "select", "_reshape_alias")


class _Inner(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "altgrad":  # the op itself is counted at the top
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.top, self.inner = [], _Inner()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.top.append(func)
        if func.namespace == "altgrad":  # run its Python implementation with the inner counter on
            with self.inner:  # the kernel itself (calling func here would dispatch to this mode again)
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        views = [f for f in self.top if _is_view(f)]
        return {"top_non_view": len(self.top) - len(views), "top_views": len(views),
                "inside_custom_ops": len(self.inner.ops),
                "ops": sorted({str(f) for f in self.top})}


def _layer(kind: str):
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    if kind == "nn.Linear":
        return lin
    return quantize_model(lin, "E4M3", backend="fast")


def fwd_bwd(layer, x, dy):
    y = layer(x)
    y.backward(dy)
    layer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["nn.Linear", "QuantizedLinear"])
def test_ops_per_forward_backward(benchmark, kind):
    layer = _layer(kind)
    x = torch.randn(M, IN, requires_grad=True)
    dy = torch.randn(M, OUT)
    for _ in range(3):  # steady state: histories filled
        fwd_bwd(layer, x, dy)
        x.grad = None
    counter = OpCounter()
    with counter:
        fwd_bwd(layer, x, dy)
    x.grad = None
    info = counter.summary()
    benchmark.group = "QuantizedLinear fwd+bwd (cpu, 1024x128 -> 512)"
    benchmark.extra_info.update(info)
    benchmark.pedantic(fwd_bwd, args=(layer, x, dy), rounds=5, warmup_rounds=1)
    print(kind, {k: v for k, v in info.items() if k != "ops"})
    if isinstance(layer, QuantizedLinear):
        assert info["top_non_view"] <= OP_BUDGET, info
