"""Compile every GPU kernel specialisation for sm_90 and sm_80 without a GPU, and check it fits.

    python -m altgrad.compile_check                 # both targets, table on stdout, exit 1 on a failure
    python -m altgrad.compile_check --target sm_90 --json out.json

What it compiles: the specialisations that `QuantizedLinear`, the tests and the benchmarks can launch
on CUDA, through the kernels' own public launchers (`quantize`, `block_quantize`, `scaled_matmul`
and `block_scaled_matmul`) called with CPU tensors, so the arguments, constexprs and alignment/divisibility
attributes are exactly those of a real launch:

- quantize: every registered format (plus E7M0 carried 2**-10 lower, as `QuantizedLinear` does) x
  nearest/stochastic x stats on/off, bf16 input, q output (what `QuantizedLinear` runs); and for E4M3
  the other outputs (dq in fp32/bf16/fp16), a strided input, saturate off and odd sizes.
- block_quantize (E8M0 block scales): every registered format at block 32 (MX); for E4M3 blocks of
  16, 32, 128 and a whole row x floor/ceil scale rounding x nearest/stochastic, odd and strided input.
- scaled_matmul: every tile of `MATMUL_CONFIGS` on its path — bf16 (pre-quantized), in-loop,
  fp8 and fp8 in-loop (fp8 on sm_90 only: FP8 tensor cores need sm_89+) — for the forward, dgrad
  and wgrad layouts, the epilogue variants (bias, bf16 output), fp32/bf16 inputs for the in-loop
  paths, the bf16/in-loop "/unaligned" lists on odd shapes (strides, M, N or K not multiples of 16, as the tests
  and a 65-character vocabulary give) and the 64-bit index variant.
- block_scaled_matmul: every tile of `BLOCK_SCALED_CONFIGS` (K steps 16 and 32) for the three layouts with
  fp32 operands and bf16 operands with bias and bf16 output; the unaligned tile (each list's last) also
  with odd fp32 operands (37x53x300: K not a multiple of the block, unaligned strides); block sizes 16 / 32 / 64 / 128 in equal and different
  pairs, a block-scaled operand beside a row-scaled one, row x row and row x per-tensor (the plain
  loop), and the 64-bit index variant.

Each distinct specialisation compiles once (Triton's own cache keys, the same as a launch). A case
fails when its shared memory exceeds the target's opt-in maximum per block (232448 B = 227 KB on
sm_90, 166912 B = 163 KB on sm_80) or when ptxas gives it a stack frame (register spills).
The table shows registers, shared memory and stack per case and, for the quantize kernel, static
SASS instructions of the whole kernel per element of one tile (instructions / (BLOCK / threads)):
a loop's once-per-program code is included, so it is an upper bound on the per-element cost.

How, without a GPU: a stand-in Triton driver reports the target (`GPUTarget("cuda", 90, 32)`), every
kernel launch is turned into a compile-only `warmup` (Triton's JIT binder, `triton.compile`,
Triton's bundled ptxas), and the launchers' device checks (`check_device`, `_device_capability`)
are bypassed for the duration. Resource usage is read from the cubin with Triton's bundled
cuobjdump. Uses only APIs present in Triton 3.6 through 3.9. Must run in a process where
TRITON_INTERPRET is unset before triton is imported (the test runs it as a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

__all__ = ["TARGETS", "KERNELS", "CaseResult", "run_checks", "main"]

# target name -> (compute capability, opt-in shared memory per block in bytes)
TARGETS = {"sm_90": (90, 232448), "sm_80": (80, 166912)}


@dataclass
class CaseResult:
    """One compiled specialisation: registers per thread, shared memory and stack frame in bytes."""

    target: str
    kernel: str
    case: str
    regs: int
    shared: int
    stack: int
    sass_per_elem: float | None = None
    problems: list[str] = field(default_factory=list)
    known: str = ""  # a known problem, reported but not failing the check (see KNOWN_PROBLEMS)


class _CompileOnlyDriver:
    """Just enough of a Triton driver for the JIT to bind arguments and compile for `target`."""

    def __init__(self, target, name: str):
        self._target, self._device = target, f"compile-only-{name}"

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return self._device

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the cubin's one kernel, from Triton's bundled cuobjdump."""
    from triton.tools.disasm import path_to_cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([path_to_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output:\n{out}")
    return int(m.group(1)), int(m.group(2))


def _sass_instructions(cubin: bytes) -> int:
    """Static SASS instruction count (NOPs excluded), from Triton's bundled cuobjdump."""
    from triton.tools.disasm import path_to_cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([path_to_cuobjdump(), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)
    return sum(1 for op in ops if op != "NOP")


# case-label prefix -> why it is tolerated for now; each must still fail (the test checks), so a fix
# shows up as a test asking to remove the entry
KNOWN_PROBLEMS = {
    "E4M3 per-row K=50304": "block_quantize puts a whole row in one program: rows past 4096 elements spill",
}


class _Recorder:
    def __init__(self, target_name: str, smem_limit: int):
        self.target_name, self.smem_limit = target_name, smem_limit
        self.case = "?"
        self.results: list[CaseResult] = []
        self._seen: set[str] = set()

    def record(self, kernel, fn_name: str, kwargs: dict) -> None:
        key = kernel.metadata.hash
        if key in self._seen:
            return
        self._seen.add(key)
        cubin = kernel.asm["cubin"]
        regs, stack = _resource_usage(cubin)
        shared = kernel.metadata.shared
        per_elem = None
        if "BLOCK" in kwargs:  # the elementwise cast kernel: instructions per element of a thread
            elems_per_thread = kwargs["BLOCK"] / (32 * kernel.metadata.num_warps)
            per_elem = round(_sass_instructions(cubin) / elems_per_thread, 1)
        problems = []
        if shared > self.smem_limit:
            problems.append(f"shared memory {shared} B > {self.smem_limit} B")
        if stack:
            problems.append(f"{stack} B stack frame (register spills)")
        known = next((why for prefix, why in KNOWN_PROBLEMS.items() if self.case.startswith(prefix)), "")
        self.results.append(CaseResult(self.target_name, fn_name, self.case, regs, shared, stack, per_elem, problems,
                                       known))


@contextlib.contextmanager
def _compile_only(target_name: str):
    """Within: kernel launches compile for the target instead of running; CPU tensors are accepted."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset before triton is imported")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from altgrad.kernels import quantize as kq
    from altgrad.kernels import scaled_matmul as ksm

    cc, smem = TARGETS[target_name]
    rec = _Recorder(target_name, smem)
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # a compile error is a failing case; the rest still compile
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip().strip("^")]
            detail = next((ln for ln in lines if "Error(" in ln), lines[-1] if lines else type(err).__name__)
            cause = err.__cause__ or err.__context__
            while cause is not None and (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                detail = f"{type(cause).__name__}: {cause}".splitlines()[0]
            rec.results.append(CaseResult(target_name, self.__name__, rec.case, 0, 0, 0, None,
                                          [f"compile error: {detail}"]))
            return None
        rec.record(kernel, self.__name__, kwargs)
        return kernel

    from altgrad.kernels import block_quantize as kbq
    from altgrad.kernels import block_scaled_matmul as kbm

    patches = [(JITFunction, "run", run), (kq, "check_device", lambda x, name: None),
               (kbq, "check_device", lambda x, name: None), (kbm, "check_device", lambda x, name: None),
               (ksm, "check_device", lambda x, name: None), (ksm, "_device_capability", lambda d: divmod(cc, 10))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", cc, 32), target_name))
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield rec
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        try:
            driver.reset_active()
        except RuntimeError:  # no real driver on this machine: leave none active
            driver._active = None
    del triton


# -- the cases ------------------------------------------------------------------------------------
def _quantize_cases(rec: _Recorder) -> None:
    import torch

    from altgrad.formats import FORMAT_REGISTRY
    from altgrad.kernels import quantize as kq

    fields = {tuple(f.kernel_fields.values()): n for n, f in FORMAT_REGISTRY.items()}
    fields[(7, 0, 74, "p3109")] = "E7M0>>10"  # QuantizedLinear's accumulation-headroom carry
    x = torch.zeros(8192, dtype=torch.bfloat16)
    s = torch.ones(1)
    for (e, m, b, sp), name in fields.items():
        for rounding in ("nearest", "stochastic"):
            for stats in (True, False):
                rec.case = f"{name} {rounding} stats={'on' if stats else 'off'} bf16->q"
                kq.cast(x, s, exp_bits=e, man_bits=m, bias=b, specials=sp, rounding=rounding, seed=12345,
                            out_q=True, out_dq=False, stats=stats)
    e4m3 = dict(exp_bits=4, man_bits=3, bias=7, specials="fn")
    for e, m, b, sp in ((4, 3, 7, "fn"), (7, 0, 74, "p3109")):  # one tile per program (small tensors)
        for rounding in ("nearest", "stochastic"):
            for stats in (True, False):
                rec.case = f"{fields[(e, m, b, sp)]} {rounding} stats={'on' if stats else 'off'} bf16->q one tile"
                kq.cast(torch.zeros(2048, dtype=torch.bfloat16), s, exp_bits=e, man_bits=m, bias=b, specials=sp,
                            rounding=rounding, seed=12345, out_q=True, out_dq=False, stats=stats)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rounding in ("nearest", "stochastic"):
            rec.case = f"E4M3 {rounding} {str(dtype)[6:]}->q,dq"
            kq.cast(torch.zeros(8192, dtype=dtype), s, **e4m3, rounding=rounding, seed=12345)
    rec.case = "E4M3 fp32 strided ->q,dq"
    kq.cast(torch.zeros(64, 96)[:, ::3], s, **e4m3)
    rec.case = "E4M3 fp32->dq saturate off"
    kq.cast(torch.zeros(8192), s, **e4m3, saturate=False, out_q=False)
    rec.case = "E4M3 bf16 odd size ->q,dq"
    kq.cast(torch.zeros(37 * 29, dtype=torch.bfloat16), s, **e4m3)


def _block_quantize_cases(rec: _Recorder) -> None:
    import torch

    from altgrad.blockwise import emax_elem
    from altgrad.formats import FORMAT_REGISTRY
    from altgrad.kernels import block_quantize as kbq

    def call(label, f, x, block_size, scale_rounding="floor", rounding="nearest"):
        rec.case = f"{label} block {block_size} {scale_rounding} {rounding} {tuple(x.shape)}"
        kbq.block_quantize(x, **f.kernel_fields,
                           block_size=block_size, emax_elem=emax_elem(f), fmt_max=f.max,
                           scale_rounding=scale_rounding, rounding=rounding, seed=12345)

    x = torch.zeros(64, 384)
    seen = set()
    for name, f in FORMAT_REGISTRY.items():  # MX block 32 in every format
        if tuple(f.kernel_fields.values()) not in seen:
            seen.add(tuple(f.kernel_fields.values()))
            call(name, f, x, 32)
    e4m3 = FORMAT_REGISTRY["E4M3"]
    for block_size in (16, 32, 128, 384):  # 384: one scale per row
        for scale_rounding in ("floor", "ceil"):
            for rounding in ("nearest", "stochastic"):
                call("E4M3", e4m3, x, block_size, scale_rounding, rounding)
    call("E4M3 odd", e4m3, torch.zeros(37, 29), 32)
    call("E4M3 strided", e4m3, torch.zeros(384, 64).t(), 32)
    for k in (4096, 8192, 50304):  # one scale per row of a long K (dgrad along a GPT-2 vocabulary)
        call(f"E4M3 per-row K={k}", e4m3, torch.zeros(2, k), k)


def _layout(name: str, M: int, N: int, K: int, dtype_a, dtype_b):
    """(A (M, K), B (N, K)) as a Linear layer's GEMMs see them: fwd K-major, dgrad B N-major (W^T),
    wgrad both M/N-major (dy^T, x^T)."""
    import torch

    if name == "fwd":
        return torch.zeros(M, K, dtype=dtype_a), torch.zeros(N, K, dtype=dtype_b)
    if name == "dgrad":
        return torch.zeros(M, K, dtype=dtype_a), torch.zeros(K, N, dtype=dtype_b).t()
    return torch.zeros(K, M, dtype=dtype_a).t(), torch.zeros(K, N, dtype=dtype_b).t()


_BASE_PATHS = ("bf16", "in_loop", "fp8", "fp8_in_loop")  # bf16 and in_loop also have "/unaligned" lists


def _matmul_cases(rec: _Recorder, fp8: bool, paths=None) -> None:
    import torch

    from altgrad.kernels import scaled_matmul as ksm

    bf16, f32 = torch.bfloat16, torch.float32
    e4m3, e5m2, e7m0 = (4, 3, 7, "fn"), (5, 2, 15, "ieee"), (7, 0, 74, "p3109")
    one = torch.ones(1)

    def call(label, layout, M, N, K, cfg, da=bf16, db=bf16, bias=False, out=f32, qa=None, qb=None, fp8_=False):
        a, b = _layout(layout, M, N, K, da, db)
        rec.case = f"{label} {layout} {M}x{N}x{K}" + (f" {cfg.block_m}x{cfg.block_n}x{cfg.block_k}/"
                                                       f"s{cfg.num_stages}w{cfg.num_warps}")
        ksm.scaled_matmul(a, b, one, one, torch.zeros(N) if bias else None, out_dtype=out, fmt_a=qa,
                          scale_a=one if qa else None, fmt_b=qb, scale_b=one if qb else None, fp8=fp8_, config=cfg)

    paths = set(paths or _BASE_PATHS)
    if not fp8:
        paths -= {"fp8", "fp8_in_loop"}
    for cfg in ksm.MATMUL_CONFIGS["bf16"] if "bf16" in paths else []:
        call("bf16 +bias ->bf16", "fwd", 256, 256, 256, cfg, bias=True, out=bf16)
        call("bf16", "fwd", 256, 256, 256, cfg)
        call("bf16 ->bf16", "dgrad", 256, 256, 256, cfg, out=bf16)
        call("bf16", "wgrad", 256, 256, 256, cfg)
    for cfg in ksm.MATMUL_CONFIGS["in_loop"] if "in_loop" in paths else []:
        call("in-loop A fp32 E4M3 +bias", "fwd", 256, 256, 256, cfg, da=f32, bias=True, qa=e4m3)
        call("in-loop A bf16 E7M0>>10 ->bf16", "fwd", 256, 256, 256, cfg, bias=True, out=bf16, qa=e7m0)
        call("in-loop A+B fp32 E4M3", "fwd", 256, 256, 256, cfg, da=f32, db=f32, qa=e4m3, qb=e4m3)
        call("in-loop A+B fp32 E5M2xE4M3", "wgrad", 256, 256, 256, cfg, da=f32, db=f32, qa=e5m2, qb=e4m3)
        call("in-loop A+B bf16 E5M2xE4M3", "dgrad", 256, 256, 256, cfg, qa=e5m2, qb=e4m3)
    # unaligned operands (odd shapes, as the tests and a 65-character vocabulary give): the small lists
    for layout in ("fwd", "dgrad", "wgrad"):
        for M, N, K in ((37, 53, 29), (37, 384, 384), (256, 65, 384)):
            for cfg in ksm.MATMUL_CONFIGS["bf16/unaligned"] if "bf16" in paths else []:
                call("bf16 unaligned +bias", layout, M, N, K, cfg, bias=True)
            for cfg in ksm.MATMUL_CONFIGS["in_loop/unaligned"] if "in_loop" in paths else []:
                call("in-loop unaligned A+B fp32 E4M3", layout, M, N, K, cfg, da=f32, db=f32, qa=e4m3, qb=e4m3)
                call("in-loop unaligned A fp32 E5M2", layout, M, N, K, cfg, da=f32, qa=e5m2)
    small = {p: ksm.MATMUL_CONFIGS[p][-1] for p in ksm.MATMUL_CONFIGS}
    f8, f5 = torch.float8_e4m3fn, torch.float8_e5m2
    if "fp8" in paths:
        for cfg in ksm.MATMUL_CONFIGS["fp8"]:
            call("fp8 e4m3 ->bf16", "fwd", 256, 256, 256, cfg, da=f8, db=f8, out=bf16, fp8_=True)
            call("fp8 e5m2xe4m3", "dgrad", 256, 256, 256, cfg, da=f5, db=f8, fp8_=True)
            call("fp8 e5m2xe4m3", "wgrad", 256, 256, 256, cfg, da=f5, db=f8, fp8_=True)
        call("fp8 e4m3 +bias", "fwd", 512, 384, 1024, small["fp8"], da=f8, db=f8, bias=True, fp8_=True)
    if "fp8_in_loop" in paths:
        for cfg in ksm.MATMUL_CONFIGS["fp8_in_loop"]:
            call("fp8 in-loop A+B fp32", "fwd", 256, 256, 256, cfg, da=f32, db=f32, qa=e4m3, qb=e4m3, fp8_=True)
            call("fp8 in-loop A+B bf16", "fwd", 256, 256, 256, cfg, qa=e4m3, qb=e4m3, fp8_=True)
            call("fp8 in-loop A+B bf16 E5M2xE4M3", "dgrad", 256, 256, 256, cfg, qa=e5m2, qb=e4m3, fp8_=True)
            call("fp8 in-loop A+B bf16 E5M2xE4M3", "wgrad", 256, 256, 256, cfg, qa=e5m2, qb=e4m3, fp8_=True)
    # 64-bit index math (chosen on the host past 2**31 element offsets): force it on small tensors
    saved, ksm.INT32_LIMIT = ksm.INT32_LIMIT, 0
    try:
        for path in sorted(paths):
            cfgs = ksm.MATMUL_CONFIGS[path]
            quant = e4m3 if "in_loop" in path else None
            dtype = f32 if quant else (torch.float8_e4m3fn if path == "fp8" else bf16)
            for cfg in (cfgs[0], cfgs[-1]):
                call(f"int64-index {path}", "fwd", 256, 256, 256, cfg, da=dtype, db=dtype, bias=True, out=bf16,
                     qa=quant, qb=quant, fp8_=path.startswith("fp8"))
    finally:
        ksm.INT32_LIMIT = saved


def _block_matmul_cases(rec: _Recorder) -> None:
    import torch

    from altgrad.kernels import block_scaled_matmul as kbm

    f32, bf16 = torch.float32, torch.bfloat16

    def call(label, layout, M, N, K, cfg, block_a, block_b, dtype=f32, bias=False, out=f32):
        a, b = _layout(layout, M, N, K, dtype, dtype)
        inv = {}
        for name, rows, block in (("a", M, block_a), ("b", N, block_b)):
            inv[name] = torch.ones(()) if block == "tensor" else torch.ones(rows, -(-K // (block or K)))
        ba, bb = (None if x == "tensor" else x for x in (block_a, block_b))
        rec.case = (f"{label} {layout} {M}x{N}x{K} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}/"
                    f"s{cfg.num_stages}w{cfg.num_warps}")
        kbm.block_scaled_matmul(a, b, inv["a"], inv["b"], torch.zeros(N) if bias else None, block_a=ba,
                                block_b=bb, out_dtype=out, config=cfg)

    # block sizes per K step (a step is the smaller block, at most 32); None: one block per row
    blocks = {16: ((16, 16), (16, 128), (16, None)), 32: ((32, 32), (128, 128), (64, None))}
    for step, cfgs in kbm.BLOCK_SCALED_CONFIGS.items():
        for cfg in cfgs:
            for layout in ("fwd", "dgrad", "wgrad"):
                call(f"block {step} fp32", layout, 256, 256, 512, cfg, step, step)
                call(f"block {step} bf16 +bias ->bf16", layout, 256, 256, 512, cfg, step, step, dtype=bf16,
                     bias=True, out=bf16)
                # odd shapes (K not a multiple of the block, odd strides): unvectorised loads, smallest tile only
                if cfg in kbm.allowed_configs(step, aligned=False):
                    call(f"block {step} fp32 odd +bias", layout, 37, 53, 300, cfg, step, step, bias=True)
            for ba, bb in blocks[step][1:]:
                call(f"block {ba}x{bb or 'row'} fp32", "fwd", 256, 256, 512, cfg, ba, bb)
    for cfg in kbm.BLOCK_SCALED_CONFIGS[kbm.k_step(None, None)]:  # no block-scaled operand: plain loop
        for layout in ("fwd", "dgrad", "wgrad"):
            call("row fp32 +bias", layout, 256, 256, 512, cfg, None, None, bias=True)
            if cfg in kbm.allowed_configs(kbm.k_step(None, None), aligned=False):
                call("row x tensor fp32 odd ->bf16", layout, 37, 53, 300, cfg, None, "tensor", out=bf16)
    # 64-bit index math (chosen on the host past 2**31 element offsets): force it on small tensors
    saved, kbm.INT32_LIMIT = kbm.INT32_LIMIT, 0
    try:
        for step, cfgs in kbm.BLOCK_SCALED_CONFIGS.items():
            for cfg in (cfgs[0], cfgs[-1]):
                call(f"int64-index block {step}", "fwd", 256, 256, 512, cfg, step, step, bias=True, out=bf16)
    finally:
        kbm.INT32_LIMIT = saved


KERNELS = ("quantize", "block_quantize", "scaled_matmul", "block_scaled_matmul")


def run_checks(target_name: str, kernels: tuple[str, ...] = KERNELS, paths=None) -> list[CaseResult]:
    """Compile the cases for one target (matmul: only `paths` of MATMUL_CONFIGS, default all);
    returns one CaseResult per distinct specialisation."""
    with _compile_only(target_name) as rec:
        if "quantize" in kernels:
            _quantize_cases(rec)
        if "block_quantize" in kernels:
            _block_quantize_cases(rec)
        if "scaled_matmul" in kernels:
            _matmul_cases(rec, fp8=TARGETS[target_name][0] >= 89, paths=paths)
        if "block_scaled_matmul" in kernels:
            _block_matmul_cases(rec)
    return rec.results


def format_table(results: list[CaseResult]) -> str:
    lines = [f"{'target':<6} {'kernel':<22} {'case':<58} {'regs':>4} {'shared B':>8} {'stack B':>7} "
             f"{'SASS/el':>7}  result"]
    for r in results:
        per = f"{r.sass_per_elem:.1f}" if r.sass_per_elem is not None else "-"
        verdict = "ok" if not r.problems else ("KNOWN" if r.known else "FAIL") + ": " + "; ".join(r.problems)
        if r.known and not r.problems:
            verdict = "FIXED (remove it from KNOWN_PROBLEMS)"
        lines.append(f"{r.target:<6} {r.kernel:<22} {r.case:<58} {r.regs:>4} {r.shared:>8} {r.stack:>7} {per:>7}  "
                     + verdict)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), action="append",
                   help="compile for this target (repeatable; default: all)")
    p.add_argument("--kernel", choices=KERNELS, action="append",
                   help="only this kernel's cases (repeatable; default: all)")
    p.add_argument("--path", choices=_BASE_PATHS, action="append",
                   help="only this matmul path of MATMUL_CONFIGS (repeatable; default: all)")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    results, t0 = [], time.time()
    for target in args.target or list(TARGETS):
        results += run_checks(target, tuple(args.kernel or KERNELS), args.path)
    print(format_table(results))
    failed = [r for r in results if bool(r.problems) != bool(r.known)]  # new problems, or known ones now fixed
    known = [r for r in results if r.problems and r.known]
    print(f"{len(results)} specialisations compiled in {time.time() - t0:.0f} s; {len(failed)} failed"
          + (f"; {len(known)} known problems: " + "; ".join(sorted({r.known for r in known})) if known else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
