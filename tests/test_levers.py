"""Issue 15's lever microbenchmark (`python3 profiling.py levers`): its plumbing, which must report a wrong variant as
wrong and never time it. Lever 2's Triton kernels are fp8.py's (--fp8-fused-quant), tested in tests/test_fp8.py.
"""

import functools

import torch

import profiling

TINY = profiling.Sizes(dim=64, mlp=256, img=24, txt=8)


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
