"""Every GPU kernel specialisation compiles for sm_90 and sm_80 and fits (no GPU needed).

`altgrad.compile_check` runs in subprocesses (one per target, in parallel): the kernels must be
imported there with TRITON_INTERPRET unset, which this test session sets. Marked `compile`: it
takes minutes on a cold Triton cache (2 cores), and `make test` runs it with the rest.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.compile


def _has_cuda_toolchain() -> bool:
    try:
        from triton.tools.disasm import path_to_cuobjdump
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return os.path.exists(path_to_cuobjdump())


needs_toolchain = pytest.mark.skipif(not _has_cuda_toolchain(),
                                     reason="Triton's NVIDIA backend (bundled ptxas/cuobjdump) is not installed")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    return env


def _spawn(args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@needs_toolchain
def test_every_specialisation_fits_sm90_and_sm80(tmp_path):
    procs = {t: _spawn(["-m", "altgrad.compile_check", "--target", t, "--json", str(tmp_path / f"{t}.json")])
             for t in ("sm_90", "sm_80")}
    outputs = {t: p.communicate(timeout=1800)[0] for t, p in procs.items()}
    for t, p in procs.items():
        print(outputs[t])
        assert p.returncode == 0, f"{t}: a specialisation does not fit:\n" + "\n".join(
            line for line in outputs[t].splitlines() if "FAIL" in line or "Error" in line)

    from altgrad.formats import FORMAT_REGISTRY
    from altgrad.kernels.block_scaled_matmul import BLOCK_SCALED_CONFIGS
    from altgrad.kernels.scaled_matmul import MATMUL_CONFIGS

    for t in ("sm_90", "sm_80"):
        rows = json.loads((tmp_path / f"{t}.json").read_text())
        cases = [r["case"] for r in rows]
        limit = {"sm_90": 232448, "sm_80": 166912}[t]
        assert rows and all(r["stack"] == 0 and r["shared"] <= limit for r in rows if not r["known"])
        assert all(r["problems"] for r in rows if r["known"])  # a known problem that is fixed must be removed
        assert {r["kernel"] for r in rows} >= {"_cast_kernel", "_block_quantize_kernel", "_scaled_matmul_kernel",
                                               "_block_scaled_matmul_kernel"}
        # coverage: every registered format x rounding x stats of the cast kernel
        for name in FORMAT_REGISTRY:
            for rounding in ("nearest", "stochastic"):
                for stats in ("on", "off"):
                    want = f" {rounding} stats={stats} bf16->q"
                    assert any(c.endswith(want) for c in cases if c.split(" ")[0] in _aliases(name)), (t, name, want)
        # coverage: every tile of every path in the three Linear layouts (fp8 needs sm_89+)
        for path, cfgs in MATMUL_CONFIGS.items():
            if path.startswith("fp8") and t == "sm_80":
                continue
            for c in cfgs:
                tile = f"{c.block_m}x{c.block_n}x{c.block_k}/s{c.num_stages}w{c.num_warps}"
                unaligned = path.endswith("/unaligned")
                for layout in ("fwd", "dgrad", "wgrad"):
                    assert any(case.endswith(tile) and f" {layout} " in case and ("unaligned" in case) == unaligned
                               for case in cases), (t, path, tile, layout)
        # coverage: every tile of the block-scaled matmul, fp32 and bf16 operands, 3 layouts; odd: the last
        block_cases = [r["case"] for r in rows if r["kernel"] == "_block_scaled_matmul_kernel"]
        for step, cfgs in BLOCK_SCALED_CONFIGS.items():
            for c in cfgs:
                tile = f"{c.block_m}x{c.block_n}x{c.block_k}/s{c.num_stages}w{c.num_warps}"
                for layout in ("fwd", "dgrad", "wgrad"):
                    for kind in ("fp32", "bf16") + (("fp32 odd",) if c == cfgs[-1] else ()):
                        assert any(case.startswith(f"block {step} {kind} ") and f" {layout} " in case
                                   and case.endswith(tile) for case in block_cases), (t, step, kind, tile, layout)
        for layout in ("fwd", "dgrad", "wgrad"):
            assert any(f" {layout} " in c and c.startswith("bf16") for c in cases)
            assert any(f" {layout} " in c and c.startswith("in-loop") for c in cases)
            if t == "sm_90":
                assert any(f" {layout} " in c and c.startswith("fp8") for c in cases)
        quant_rows = [r for r in rows if r["sass_per_elem"] is not None]
        assert quant_rows and all(r["sass_per_elem"] > 0 for r in quant_rows)


def _aliases(name):
    """Names under which a registered format appears in the table (formats with the same fields
    are one specialisation, listed under the first name)."""
    from altgrad.formats import FORMAT_REGISTRY

    f = FORMAT_REGISTRY[name]
    same = [n for n, g in FORMAT_REGISTRY.items()
            if tuple(g.kernel_fields.values()) == tuple(f.kernel_fields.values())]
    return set(same)


@needs_toolchain
def test_check_fails_on_configs_that_do_not_fit():
    """The tiles the FP8 path used before it had its own in-loop list stage fp32 tiles in shared memory
    (> 227 KB) or spill: the check must report them and exit non-zero."""
    script = textwrap.dedent("""
        import sys
        from altgrad import compile_check
        from altgrad.kernels import scaled_matmul as ksm
        MC = ksm.MatmulConfig
        ksm.MATMUL_CONFIGS["fp8_in_loop"] = [MC(128, 256, 128, 3, 8), MC(128, 64, 128, 4, 4)]
        sys.exit(compile_check.main(["--target", "sm_90", "--kernel", "scaled_matmul", "--path", "fp8_in_loop"]))
    """)
    p = _spawn(["-c", script])
    out = p.communicate(timeout=1800)[0]
    print(out)
    assert p.returncode == 1, out
    fails = [line for line in out.splitlines() if "FAIL" in line]
    assert any("shared memory" in line and "> 232448 B" in line for line in fails), out
    assert all("fp8 in-loop" in line or "fp8_in_loop" in line for line in fails), out
