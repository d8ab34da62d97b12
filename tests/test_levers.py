"""Issue 15's lever microbenchmark (`python3 profiling.py levers`): its hand-written Triton kernels against the formulas
they would replace, and its plumbing, which must report a wrong variant as wrong and never time it.

The Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1) where triton is installed (it
ships with PyTorch's CUDA builds; on a CPU machine `pip install triton`), and compiled on a GPU (marked cuda).
"""

import functools
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import profiling
from optimized_inference import gelu_tanh

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = profiling.Sizes(dim=64, mlp=256, img=24, txt=8)


def randn(*shape, std=1.0, seed=0):
    return (std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).bfloat16()


def assert_e4m3_rows(q: torch.Tensor, s: torch.Tensor, exact: torch.Tensor, interpreted: bool) -> None:
    """(q, s) quantizes `exact` [rows, width] per row: s = the row's amax / 448, q = exact / s rounded to e4m3.

    Allowed: an element within 1e-5 of an e4m3 rounding boundary going either way (the kernel's sigmoid and square
    root are not torch's to the last bit); and in Triton's interpreter, whose float conversion (_convert_float in
    triton/runtime/interpreter.py) does not carry a rounded-up mantissa into the exponent (31.9 becomes 16, not 32)
    and truncates subnormals (below 2^-6), those two errors. Compiled on a GPU the cast is the hardware's.
    """
    amax = exact.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(s, amax / 448, rtol=1e-5, atol=0)
    scaled = exact * (448 / amax)
    low, high = ((scaled * f).clamp(-448, 448).to(torch.float8_e4m3fn).float() for f in (1 - 1e-5, 1 + 1e-5))
    got = q.float()
    ok = (got == low) | (got == high)
    if interpreted:
        carry_lost = (torch.frexp(high).mantissa.abs() == 0.5) & (got == high / 2)
        subnormal_off = (scaled.abs() < 2**-6) & ((got - scaled).abs() <= 2**-9)  # 2^-9: e4m3's subnormal step
        ok |= carry_lost | subnormal_off
    assert ok.all(), f"{(~ok).sum().item()} of {ok.numel()} e4m3 values differ"


def check_kernels(device: str) -> None:
    """Both kernels at widths that are not powers of two (the masked lanes count), the MLP input a column slice."""
    x = randn(1, 6, 48, seed=1)
    shift, scale = randn(48, std=0.5, seed=2), randn(48, std=0.5, seed=3)
    q, s = profiling.triton_ln_modulate_quant(*(t.to(device) for t in (x, shift, scale)))
    exact = F.layer_norm(x.float(), (48,), eps=1e-6) * (1 + scale.float()) + shift.float()
    assert q.shape == (6, 48) and q.dtype == torch.float8_e4m3fn and s.shape == (6, 1)
    assert_e4m3_rows(q.cpu(), s.cpu(), exact[0], device == "cpu")

    a = randn(1, 6, 40, seed=4)
    qkv_mlp = randn(1, 6, 3 * 16 + 72, std=2.0, seed=5)  # the single blocks' MLP input: a slice of to_qkv_mlp's output
    h = qkv_mlp[..., 48:]
    for attn, mlp, exact in ((a, h, torch.cat([a.float(), gelu_tanh(h.float())], dim=-1)),
                             (None, h, gelu_tanh(h.float())), (a, None, a.float())):
        q, s = profiling.triton_gelu_quant(*(t.to(device) if t is not None else None for t in (attn, mlp)))
        assert q.shape == exact.shape[1:]
        assert_e4m3_rows(q.cpu(), s.cpu(), exact[0], device == "cpu")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_the_interpreter():
    # A process of its own: the interpreter must be on before triton is first imported (inductor may have imported
    # it in this one), or triton.language's own functions are compiled ones, which the interpreter cannot call.
    child = subprocess.run([sys.executable, "-c", "from tests.test_levers import check_kernels; check_kernels('cpu')"],
                           env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO_ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]


@pytest.mark.cuda
def test_triton_kernels_on_the_gpu():
    check_kernels("cuda")


def test_levers_time_right_variants_and_report_a_wrong_one():
    cases = profiling.lever_cases(torch.device("cpu"), TINY, compiled=False, kernels=False)
    # Every gated GEMM of a step is covered once: 4 per double block, 1 per single block
    assert sum(c.calls for c in cases if c.lever == "L1") == 4 * TINY.double_blocks + TINY.single_blocks

    def bias_not_gated(i):  # a plausible slip in lever 1: the gate folded into the scale but not into the bias
        y = torch._scaled_mm(i.q, i.lin.weight.t(), scale_a=i.s, scale_b=i.gated_scale, bias=i.lin.bias,
                             out_dtype=torch.bfloat16)
        return i.x + y

    cases[0].variants["bias not gated (planted)"] = bias_not_gated
    timed = []

    def bench(calls: list[functools.partial]) -> float:
        timed.extend(call.func for call in calls)
        return 1.0

    rows = profiling.run_levers(cases, bench, torch.device("cpu"))
    planted = next(r for r in rows if r["variant"] == "bias not gated (planted)")
    assert not planted["ok"] and planted["rel_err"] > profiling.BF16_TOL and "us" not in planted
    assert bias_not_gated not in timed
    right = [r for r in rows if r is not planted]
    assert right and all(r["ok"] and r["us"] == 1.0 for r in right), [r for r in right if not r["ok"]]
    assert len(timed) == len(right)
    assert "WRONG" in profiling.format_levers(rows)


def test_levers_time_over_copies_of_the_inputs():
    case = profiling.lever_cases(torch.device("cpu"), TINY, compiled=False, kernels=False, levers=("L1",))[0]
    timed = []
    profiling.run_case(case, lambda calls: timed.append(calls) or 1.0, torch.device("cpu"),
                       rotate_bytes=3 * profiling.tensor_bytes(case.inputs()))
    assert len(timed) == len(case.variants) and all(len(calls) == 3 for calls in timed)
    assert len({id(call.args[0]) for call in timed[0]}) == 3  # three sets of inputs
