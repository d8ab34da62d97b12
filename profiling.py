"""--profile for optimized_inference.py: one more run under torch.profiler, GPU time per denoising step by kind of
kernel (GEMM, attention, inductor's Triton kernels, other) and the top kernels. Imported only with --profile."""

from __future__ import annotations

import json
import os

import torch

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

