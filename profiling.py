"""--profile for optimized_inference.py: one more run under torch.profiler, GPU time per denoising step by kind of
kernel (GEMM, attention, inductor's Triton kernels, other) and the top kernels. Imported only with --profile.

`python3 profiling.py levers --out DIR` (CUDA): issue 15's candidate kernel changes, each checked against a reference
and timed alone at FLUX.1-dev's shapes against the kernels the model runs today; a table and levers.json in DIR."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optimized_inference import Pipeline, Request, Timer, generate, sync


def profile_run(pipe: Pipeline, req: Request, path: str) -> dict:
    """One more run under torch.profiler: GPU kernel time per denoising step by kind, and the top kernels.

    Writes a Chrome trace next to `path` (open it in Perfetto) and the breakdown as JSON to `path`.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(pipe, req, Timer(pipe.device))
        sync(pipe.device)
    if not pipe.is_main_rank:  # context parallel: every rank runs the request, rank 0's profile is the report
        return {}
    prof.export_chrome_trace(os.path.splitext(path)[0] + ".trace.json")
    # First match wins: inductor names its kernels after the ops they fuse ("triton_..._cudnn_attention_..."),
    # and its GEMM templates are "triton_tem_...".
    kinds = [("gemm", ("triton_tem",)), ("triton", ("triton",)), ("attention", ("attention", "fmha", "flash", "sdpa")),
             ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "splitk"))]
    per_kind, top = dict.fromkeys(["gemm", "attention", "triton", "other"], 0.0), []
    for e in prof.key_averages():
        ms = e.self_device_time_total / 1000
        if ms <= 0 or e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.key.lower()
        kind = next((k for k, words in kinds if any(w in name for w in words)), "other")
        per_kind[kind] += ms / req.steps
        top.append((round(ms / req.steps, 3), e.count // req.steps, e.key[:100]))
    top.sort(reverse=True)
    report = {"ms_per_step_by_kind (includes text encoders and VAE, spread over steps)": per_kind,
              "top_kernels (ms per step, calls per step, name)": top[:25]}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print("GPU ms per step by kind:", {k: round(v, 2) for k, v in per_kind.items()})
    for ms, calls, name in top[:12]:
        print(f"  {ms:8.3f} ms x{calls:<4} {name}")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Issue 15's levers: each candidate kernel change timed alone at FLUX.1-dev's shapes, against what the model runs today
# (`python3 profiling.py levers --out DIR`; gpu_checks.sh's `levers` step). Nothing here is on the model's path.
# ----------------------------------------------------------------------------------------------------------------------
STEPS = 28
HBM_BYTES_PER_S = 4.3e12  # what a streaming kernel reaches on the lent H200: the floor of memory-bound work
ROTATE_BYTES = 256 * 2**20  # inputs cycled through when timing: five times an H200's 50 MB L2 cache
# A variant counts as right when its output is this close (‖a − b‖ / ‖b‖) to the reference's on the same inputs.
# fp8: a variant that keeps float32 where the eager reference rounds to bf16 (modulate rounds three times) moves a few
# percent of the elements across an e4m3 rounding boundary, each by one step of 6–12%: ~2e-2 on random data (inductor's
# LayerNorm + modulate + quant on the CPU: 1.4e-2 to 2.2e-2); a wrong formula is off by O(1). The Triton kernels are
# checked to the last bit in tests/test_levers.py. bf16: another summation order or one rounding less, ~1e-3.
FP8_TOL, BF16_TOL = 6e-2, 1e-2
# Which model each lever speeds up, and its denoiser time today (issue 15's run on the lent H200, 28 steps)
LEVER_MODEL = {"L1": ("fp8", 2.52), "L2": ("fp8", 2.52), "L3": ("bf16", 3.56)}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The widths and token counts the levers run at; FLUX.1-dev at 1024x1024 with 512 T5 tokens by default (the
    CPU tests use tiny ones). The single blocks run text and image joined: txt + img tokens."""

    dim: int = 3072
    mlp: int = 12288
    img: int = 4096
    txt: int = 512
    double_blocks: int = 19
    single_blocks: int = 38


@dataclasses.dataclass
class Case:
    """One lever at one shape: a reference, and variants timed against the first of them, the model's path today.

    `inputs` makes fresh random inputs (never zeros: a kernel on zeros can run faster than on data); the reference
    and each variant take them as one namespace and return a tensor, or (e4m3 values, per-row scales).
    """

    lever: str
    name: str
    calls: int  # per denoising step, in the whole model
    inputs: Callable[[], SimpleNamespace]
    reference: Callable[[SimpleNamespace], Any]
    variants: dict[str, Callable[[SimpleNamespace], Any]]
    tol: float
    floor_bytes: int = 0  # bytes a memory-bound variant has to move (0 for GEMMs)


def dequantized(out) -> torch.Tensor:
    """A variant's output as float32 values: e4m3 values times their per-row scales, or the bf16 tensor."""
    if isinstance(out, tuple):
        q, scale = out
        return (q.float() * scale).flatten()
    return out.float().flatten()


def relative_error(out, ref) -> float:
    a, b = dequantized(out).double(), dequantized(ref).double()
    return ((a - b).norm() / b.norm()).item()


def lever_cases(device: torch.device, sizes: Sizes = Sizes(), compiled: bool = True, kernels: bool = True,
                levers: tuple[str, ...] = ("L1", "L2", "L3")) -> list[Case]:
    """Issue 15's levers at every shape a step meets them, with how often (model code: DoubleStreamBlock,
    SingleStreamBlock, FeedForward; fp8.Float8Linear wraps every linear layer of the blocks but the adaLN ones).

    L1 (fp8): the adaLN gate folded into the gated GEMMs' _scaled_mm (scale_b ⊙ gate, gate ⊙ bias), leaving the
        residual add: double blocks' to_out, to_add_out, ff.net.2, ff_context.net.2; single blocks' proj_out.
    L2 (fp8): the passes before an fp8 GEMM as one kernel per row: LayerNorm + modulate + amax + cast (the inputs of
        to_qkv, to_added_qkv, both FeedForwards, to_qkv_mlp); GELU + amax + cast (the input of ff.net.2; in the single
        blocks [attention | GELU(mlp)], the input of proj_out); the attention output's amax + cast (to_out,
        to_add_out). Inductor's kernels (the fp8 model's compile options; --no-fp8-fused-quant) against fp8.py's
        Triton kernels (--fp8-fused-quant, which runs them in the model; not the attention output's).
    L3 (bf16): the GELU after ff.net.0 and the gated residual after the gated GEMMs in the GEMM's epilogue, through
        inductor's Triton GEMM templates (max-autotune), against cuBLAS and inductor's separate pointwise kernel; for
        GELU also cuBLASLt's own bias + GELU epilogue. (The single blocks' GELU applies to a column slice of the fused
        q/k/v + MLP GEMM, which no epilogue here handles.)
    compiled: include the torch.compile variants (here CUDA only: inductor's CPU compile is minutes of C++);
    kernels: include the Triton kernels. Inputs are made when a case runs, one case's at a time.
    """
    import fp8
    from optimized_inference import Options, compile_options, gelu_tanh, modulate

    d, mlp, img, txt, joint = sizes.dim, sizes.mlp, sizes.img, sizes.txt, sizes.img + sizes.txt
    double, single = sizes.double_blocks, sizes.single_blocks
    gen = torch.Generator(device).manual_seed(0)
    bf16 = torch.bfloat16

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen, device=device)).to(bf16)

    def weights(k, n):  # N(0, 1/k) as a trained layer's; a bias large enough that a bias wrongly handled shows
        return randn(n, k, std=k**-0.5), randn(n, std=0.1)

    def linear(k, n):
        layer = nn.Linear(k, n, device=device, dtype=bf16)
        layer.weight.data, layer.bias.data = weights(k, n)
        return layer

    def tokens_dynamic(t):  # as the model compiles its blocks: one graph for every token count
        torch._dynamo.mark_dynamic(t, t.dim() - 2)
        return t

    def ln_quant(x, shift, scale):
        return fp8.quantize_fp8(modulate(x, shift, scale))

    def gelu_quant(h):
        return fp8.quantize_fp8(gelu_tanh(h))

    def cat_gelu_quant(a, qkv_mlp):  # SingleStreamBlock: proj_out's input, the MLP part a slice of to_qkv_mlp's output
        return fp8.quantize_fp8(torch.cat([a, gelu_tanh(qkv_mlp[..., 3 * d:])], dim=-1))

    def linear_gelu(h, w, b):
        return gelu_tanh(F.linear(h, w, b))

    def gated_linear(x, gate, h, w, b):
        return x + gate[:, None] * F.linear(h, w, b)

    fp8_inductor = compile_options(Options(quantize="fp8"))  # the fp8 model's inductor options
    # A Triton GEMM template is the only choice, so that what is timed is the template with its epilogue fused
    # (with cuBLAS among the choices inductor may keep cuBLAS + a pointwise kernel, the baseline).
    autotune = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON", "epilogue_fusion": True}
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        autotune["triton.enable_persistent_tma_matmul"] = True  # Hopper's TMA templates too, as --inductor-tuning

    def compile_static(fn, options):  # one graph per shape: GEMM autotuning picks its configuration per shape
        return torch.compile(fn, dynamic=False, options=options)

    cases = []
    if "L1" in levers:
        def l1(name, tokens, k, calls):
            def inputs():
                lin = fp8.Float8Linear(linear(k, d))
                h, gate = randn(tokens, k), randn(1, d, std=0.5)
                q, s = fp8.quantize_fp8(h)  # both variants start from the same quantized activations
                # Lever 1's per-step vectors, which the conditioning would compute once per request
                gated_scale, gated_bias = lin.scale * gate.float(), (gate[0].float() * lin.bias.float()).to(bf16)
                return SimpleNamespace(lin=lin, x=randn(tokens, d), h=h, q=q, s=s, gate=gate, gated_scale=gated_scale,
                                       gated_bias=gated_bias)

            def today(i):  # Float8Linear's GEMM, then inductor's x + gate * y (one kernel, as addcmul)
                y = torch._scaled_mm(i.q, i.lin.weight.t(), scale_a=i.s, scale_b=i.lin.scale, bias=i.lin.bias,
                                     out_dtype=bf16, use_fast_accum=fp8.FP8_FAST_ACCUM)
                return torch.addcmul(i.x, i.gate, y)

            def folded(i):  # gate (s_a s_w (q W) + b) = s_a (s_w gate) (q W) + gate b, then the residual add alone
                y = torch._scaled_mm(i.q, i.lin.weight.t(), scale_a=i.s, scale_b=i.gated_scale, bias=i.gated_bias,
                                     out_dtype=bf16, use_fast_accum=fp8.FP8_FAST_ACCUM)
                return i.x + y

            cases.append(Case("L1", f"fp8 gated GEMM {name} [{tokens}x{k}]@[{k}x{d}]", calls, inputs,
                              lambda i: i.x + i.gate * i.lin(i.h),
                              {"GEMM + gated residual (today)": today, "gate in scale_b + bias, GEMM + add": folded},
                              BF16_TOL))  # the same e4m3 operands as the reference: only the epilogue's rounding

        l1("single proj_out", joint, d + mlp, single)
        l1("double to_out", img, d, double)
        l1("double ff.net.2", img, mlp, double)
        l1("double to_add_out", txt, d, double)
        l1("double ff_context.net.2", txt, mlp, double)

    if "L2" in levers:
        inductor_fp8 = {}  # one compiled function per formula: its graph serves every token count

        def l2(name, tokens, calls, inputs, reference, triton_call, floor_width, warps):
            variants = {}
            if compiled:
                inductor = inductor_fp8.setdefault(reference, torch.compile(reference, options=fp8_inductor))
                variants["inductor (today)"] = lambda i: inductor(*i.args)
            if kernels:  # a whole row per program: the warps set how many registers each thread holds
                for w in warps:
                    variants[f"Triton, one pass per row, {w} warps"] = functools.partial(triton_call, num_warps=w)
            # bf16 in, e4m3 out, one float32 scale per token
            floor = tokens * (floor_width * 3 + 4)
            cases.append(Case("L2", f"fp8 {name} [{tokens}x{floor_width}]", calls, inputs,
                              lambda i: reference(*i.args), variants, FP8_TOL, floor))

        for tokens, calls, where in ((joint, single, "single"), (img, 2 * double, "double img"),
                                     (txt, 2 * double, "double txt")):
            l2(f"LN + modulate + quant, {where}", tokens, calls,
               lambda t=tokens: SimpleNamespace(args=(tokens_dynamic(randn(1, t, d)), randn(1, d, std=0.5),
                                                      randn(1, d, std=0.5))),
               ln_quant, lambda i, num_warps: fp8.triton_ln_modulate_quant(*i.args, num_warps=num_warps)[1:], d,
               (4, 8))
        l2("[attn | GELU] + quant, single", joint, single,
           lambda: SimpleNamespace(args=(tokens_dynamic(randn(1, joint, d)),
                                         tokens_dynamic(randn(1, joint, 3 * d + mlp, std=2.0)))),
           cat_gelu_quant, lambda i, num_warps: fp8.triton_gelu_quant(i.args[0], i.args[1][..., 3 * d:], num_warps),
           d + mlp, (8, 16, 32))
        for tokens, where in ((img, "double img"), (txt, "double txt")):
            l2(f"GELU + quant, {where}", tokens, double,
               lambda t=tokens: SimpleNamespace(args=(tokens_dynamic(randn(1, t, mlp, std=2.0)),)),
               gelu_quant, lambda i, num_warps: fp8.triton_gelu_quant(None, i.args[0], num_warps), mlp, (8, 16, 32))
            l2(f"attention output quant, {where}", tokens, double,
               lambda t=tokens: SimpleNamespace(args=(tokens_dynamic(randn(1, t, d)),)),
               fp8.quantize_fp8, lambda i, num_warps: fp8.triton_gelu_quant(i.args[0], None, num_warps), d, (4, 8))

    if "L3" in levers:
        def l3(name, tokens, k, n, calls, fn, inputs, cublaslt=None):
            variants = {}
            if compiled:
                today, fused = compile_static(fn, compile_options(Options())), compile_static(fn, autotune)
                variants["inductor: cuBLAS + pointwise (today)"] = lambda i: today(*i.args)
                variants["inductor max-autotune: Triton GEMM + epilogue"] = lambda i: fused(*i.args)
            if cublaslt:
                variants["cuBLASLt bias + GELU epilogue"] = cublaslt
            cases.append(Case("L3", f"bf16 {name} [{tokens}x{k}]@[{k}x{n}]", calls, inputs,
                              lambda i: fn(*i.args), variants, BF16_TOL))

        for tokens, where in ((img, "double img"), (txt, "double txt")):
            l3(f"linear + GELU, {where}", tokens, d, mlp, double, linear_gelu,
               lambda t=tokens: SimpleNamespace(args=(randn(1, t, d), *weights(d, mlp))),
               lambda i: torch._addmm_activation(i.args[2], i.args[0][0], i.args[1].t(), use_gelu=True))
        for tokens, k, calls, where in ((joint, d + mlp, single, "single proj_out"), (img, mlp, double, "double ff"),
                                        (img, d, double, "double to_out"), (txt, mlp, double, "double ff_context"),
                                        (txt, d, double, "double to_add_out")):
            l3(f"gated residual, {where}", tokens, k, d, calls, gated_linear,
               lambda t=tokens, k=k: SimpleNamespace(args=(randn(1, t, d), randn(1, d, std=0.5), randn(1, t, k),
                                                           *weights(k, d))))
    return cases


def kernels_per_call(fn: Callable[[], Any]) -> list[str]:
    """The GPU kernels one call of fn launches, by name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def cuda_graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured as a CUDA graph, as the model's step runs: the time is the kernels', not Python's or launches'."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def gpu_microseconds(calls: list[Callable[[], Any]]) -> float:
    """GPU time of one call in µs: the calls (one variant on different copies of its inputs) captured one after the
    other as one CUDA graph, replayed 30 times after 3 warm-ups, each replay timed with CUDA events; the median
    replay divided by the number of calls."""
    def all_calls():  # the outputs kept to the end: each call writes memory of its own, as in the model's step
        return [call() for call in calls]

    try:
        replay = cuda_graphed(all_calls)
    except RuntimeError as e:  # still a number, with the launch gaps in it
        print(f"  not capturable as a CUDA graph, timed as launched ({str(e).splitlines()[0][:120]})")
        replay = all_calls
    for _ in range(3):
        replay()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1000 * statistics.median(times) / len(calls)


def tensor_bytes(inputs: SimpleNamespace) -> int:
    """The bytes of a case's inputs: its tensors, tuples of them and modules' buffers."""
    tensors = []
    for value in vars(inputs).values():
        if isinstance(value, nn.Module):
            tensors += list(value.buffers())
        elif isinstance(value, tuple):
            tensors += value
        else:
            tensors.append(value)
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def run_case(case: Case, bench: Callable[[list[Callable[[], Any]]], float], device: torch.device,
             rotate_bytes: int = 0) -> list[dict]:
    """The case's reference, then each variant on the same inputs: checked against the reference first, timed only
    when right. Rows give µs per call and what that is per step and per 28 steps, and the change against the first
    variant (the model's path today): negative saves.

    Timed over copies of the inputs, fresh random ones, together at least `rotate_bytes`: with more bytes than the L2
    cache holds, each call reads its weights and activations from memory, not from the cache lines the call before
    left there (in the model a kernel's inputs are at best partly in the cache: this errs on the slow side, alike for
    every variant)."""
    inputs = case.inputs()
    ref = case.reference(inputs)
    copies = [inputs] + [case.inputs() for _ in range(math.ceil(rotate_bytes / tensor_bytes(inputs)) - 1)]
    rows, baseline = [], None
    for name, variant in case.variants.items():
        row = {"lever": case.lever, "case": case.name, "variant": name, "calls_per_step": case.calls,
               "floor_us": round(case.floor_bytes / HBM_BYTES_PER_S * 1e6, 1) if case.floor_bytes else None}
        try:
            start = time.perf_counter()
            out = variant(inputs)  # the first call compiles (and autotunes)
            row["first_call_s"] = round(time.perf_counter() - start, 1)
            err = relative_error(out, ref)
            row |= {"rel_err": err, "ok": bool(err <= case.tol)}  # a NaN error is not <= tol: wrong
            if row["ok"]:
                us = bench([functools.partial(variant, c) for c in copies])
                names = kernels_per_call(functools.partial(variant, inputs)) if device.type == "cuda" else []
                row |= {"us": round(us, 1), "kernels": len(names), "kernel_names": sorted(set(names)),
                        "ms_per_step": round(us * case.calls / 1000, 3),
                        "s_per_28_steps": round(us * case.calls * STEPS / 1e6, 4)}
        except Exception as e:  # a variant that does not run on this torch/GPU is reported, the others still run
            row |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        if baseline is None:
            baseline = row.get("us")
        if baseline is not None and row.get("us") is not None:
            row["delta_s_per_28_steps"] = round((row["us"] - baseline) * case.calls * STEPS / 1e6, 4)
        rows.append(row)
    return rows


def format_levers(rows: list[dict]) -> str:
    """The table, then per lever what the best right variant of each case would change in the model."""
    head = (f"{'lever':<5} {'case':<64} {'variant':<46} {'rel err':>8} {'kern':>4} {'µs/call':>8} {'floor':>6} "
            f"{'calls':>5} {'ms/step':>8} {'s/28':>7} {'Δ s/28':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        status = f"{r['rel_err']:8.1e}" if "rel_err" in r else f"{'':8}"
        status += " FAILED" if "error" in r else " WRONG" if not r["ok"] else ""
        if not r["ok"]:
            lines.append(f"{r['lever']:<5} {r['case']:<64} {r['variant']:<46} {status}  {r.get('error', '')}")
            continue
        floor = f"{r['floor_us']:6.1f}" if r["floor_us"] is not None else " " * 6
        delta = f"{r['delta_s_per_28_steps']:+8.3f}" if r.get("delta_s_per_28_steps") is not None else " " * 8
        lines.append(f"{r['lever']:<5} {r['case']:<64} {r['variant']:<46} {status} {r['kernels']:>4} "
                     f"{r['us']:8.1f} {floor} {r['calls_per_step']:>5} {r['ms_per_step']:8.3f} "
                     f"{r['s_per_28_steps']:7.3f} {delta}")
    lines += ["", "What inductor generates (kernels of one call):"]
    lines += [f"  {r['case']} / {r['variant']}: {', '.join(n[:90] for n in r['kernel_names'])}" for r in rows
              if r["variant"].startswith("inductor") and r.get("kernel_names")]
    lines.append("")
    for lever in dict.fromkeys(r["lever"] for r in rows):
        best = {}
        for r in rows:
            if r["lever"] == lever and r.get("delta_s_per_28_steps") is not None:
                best[r["case"]] = min(best.get(r["case"], 0.0), r["delta_s_per_28_steps"])
        total, (model, today) = sum(best.values()), LEVER_MODEL[lever]
        lines.append(f"{lever}: the best right variant of each case, together: {total:+.3f} s per 28 steps "
                     f"({1000 * total / STEPS:+.2f} ms per step): {model} denoiser {today:.2f} -> "
                     f"{today + total:.2f} s if the model's kernels behave as these do alone")
    return "\n".join(lines)


def run_levers(cases: list[Case], bench: Callable[[list[Callable[[], Any]]], float], device: torch.device,
               out_dir: str | None = None, rotate_bytes: int = 0) -> list[dict]:
    """Every case in turn (run_case); with out_dir, levers.json after each case (a run cut short keeps what it
    measured) and the table as table.txt at the end."""
    rows = []
    for case in cases:
        start = time.perf_counter()
        rows += run_case(case, bench, device, rotate_bytes)
        print(f"[{time.perf_counter() - start:5.1f} s] {case.lever} {case.name}: " + ", ".join(
            f"{r['variant']} {r['us'] if r.get('us') is not None else 'not timed'} µs (first call "
            f"{r.get('first_call_s')} s)" for r in rows if r["case"] == case.name), flush=True)
        if out_dir:
            with open(os.path.join(out_dir, "levers.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "rows": rows}, f, indent=1)
    table = format_levers(rows)
    print(table)
    if out_dir:
        with open(os.path.join(out_dir, "table.txt"), "w") as f:
            f.write(table + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Performance analysis beside --profile. `levers`: issue 15's "
                                     "candidate kernel changes, each timed alone at FLUX.1-dev's shapes (CUDA).")
    parser.add_argument("what", choices=["levers"])
    parser.add_argument("--out", required=True, help="folder for levers.json and table.txt")
    parser.add_argument("--levers", default="L1,L2,L3", help="which levers, comma-separated (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: the levers are timed on a CUDA GPU; none is available here")
    os.makedirs(args.out, exist_ok=True)
    # Several compiled functions share their code objects (one per lever, many shapes and options): more graphs per
    # function than dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = 64
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    run_levers(lever_cases(device, levers=tuple(args.levers.split(","))), gpu_microseconds, device, args.out,
               rotate_bytes=ROTATE_BYTES)


if __name__ == "__main__":
    main()
