"""Linear layer forward+backward (CUDA only): `pytest benchmarks/test_bench_linear.py --benchmark-only`.

Three sides per shape, each one training step of one layer (forward, then backward of a fixed dy)
under bf16 autocast, as nanoGPT trains:

    bf16         nn.Linear (cuBLAS)                                                  the baseline
    simulated    QuantizedLinear, E4M3 input/weight, E5M2 grad_output, delayed scaling, Triton kernels
    fake-quant   what a user would write instead: per-tensor current scaling, the `x.to(float8)
                 .to(bf16)` round trip for x, W and dy, and three bf16 matmuls, under torch.compile

Shapes: 4096^3 and GPT-small's (M = 12 x 256 = 3072 tokens; 384->1536 c_fc, 1536->384 c_proj,
384->1152 c_attn). Every side is timed with the same clock: `triton.testing.do_bench` (CUDA events,
L2 flushed between calls, median), all three in the same test: extra_info holds each side's device
time and the ratios; pytest-benchmark's own columns are the simulated side's wall-clock time per
synchronized call (launch overhead included), for the host-bound picture.
"""

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Linear benchmarks need a CUDA GPU")

from timing import device_ms, wall  # noqa: E402  (benchmarks/timing.py)

from altgrad.config import LayerQuantConfig, RoleConfig  # noqa: E402
from altgrad.linear import QuantizedLinear  # noqa: E402

SHAPES = {  # name: (tokens M, in_features, out_features)
    "4096^3": (4096, 4096, 4096),
    "gpt-small c_fc 384->1536": (3072, 384, 1536),
    "gpt-small c_proj 1536->384": (3072, 1536, 384),
    "gpt-small c_attn 384->1152": (3072, 384, 1152),
}


def _problem(shape):
    M, k_in, k_out = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = nn.Linear(k_in, k_out, bias=False, device="cuda")
    x = torch.randn(M, k_in, device="cuda", generator=g).requires_grad_()
    dy = torch.randn(M, k_out, device="cuda", dtype=torch.bfloat16, generator=g)
    return lin, x, dy


def _fwd_bwd(module, x, dy):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(x)
        y.backward(dy)
    return step


def _fake_quant(t, fmax, dtype):
    """Current scaling + the native float8 round trip: (format-domain bf16 values, inv_scale)."""
    scale = fmax / t.abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).to(dtype).to(torch.bfloat16), torch.reciprocal(scale)


@torch.compile
def _fake_quant_fwd_bwd(x, w, dy):
    xq, ix = _fake_quant(x, 448.0, torch.float8_e4m3fn)
    wq, iw = _fake_quant(w, 448.0, torch.float8_e4m3fn)
    gq, ig = _fake_quant(dy, 57344.0, torch.float8_e5m2)
    y = (xq @ wq.t()) * (ix * iw)
    dx = (gq @ wq) * (ig * iw)
    dw = (gq.t() @ xq) * (ig * ix)
    return y.to(torch.bfloat16), dx.to(torch.bfloat16), dw.float()


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_fwd_bwd(benchmark, shape):
    """All three sides of one shape in one test (same clock, same run); the result line is printed
    as soon as it is measured (`pytest -s` keeps it even if the run is cut off)."""
    lin, x, dy = _problem(shape)
    cfg = LayerQuantConfig(RoleConfig("E4M3"), RoleConfig("E4M3"), RoleConfig("E5M2"))
    ql = QuantizedLinear(lin, cfg, name=shape, backend="triton")
    ql.stats_level = "scale"  # what train.py does between logging steps
    sides = {"bf16": _fwd_bwd(lin, x, dy), "simulated": _fwd_bwd(ql, x, dy)}
    w, xd = lin.weight.detach(), x.detach()
    sides["fake_quant_compiled"] = lambda: _fake_quant_fwd_bwd(xd, w, dy)
    ms = {}
    for name, step in sides.items():
        ms[name] = device_ms(step, rep=200)
        print(f"\nRESULT linear fwd+bwd {shape}: {name} {ms[name]:.4f} ms (ratio to bf16 "
              f"{ms[name] / ms['bf16']:.3f})", flush=True)
    benchmark.group = "linear fwd+bwd, simulated E4M3/E5M2 (wall clock)"
    benchmark.extra_info.update({f"{k}_ms": round(v, 4) for k, v in ms.items()})
    benchmark.extra_info["simulated_vs_bf16"] = round(ms["simulated"] / ms["bf16"], 3)
    benchmark.extra_info["fake_quant_vs_simulated"] = round(ms["fake_quant_compiled"] / ms["simulated"], 3)
    wall(benchmark, sides["simulated"])
