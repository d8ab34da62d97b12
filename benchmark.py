"""Reproduce the comparison table: diffusers' FluxPipeline, the reference script and the optimized ladder.

    python benchmark.py --random-weights                # every configuration, FLUX.1-dev sized, random weights
    python benchmark.py --configs diffusers-eager,reference,opt+attention
    python benchmark.py --model black-forest-labs/FLUX.1-dev --configs opt-text128,opt-text512

Each configuration (a row of the table) runs in a fresh subprocess with its own compile cache, so compiled kernels,
CUDA graphs and allocator state of one row never help another. A row that fails is reported as failed, with the
last line of its error, and the other rows still run; `<out-dir>/<config>.log` holds each row's full output.

Rows (--configs takes a comma-separated list; all of them by default, in this order):
  diffusers-eager                 diffusers' FluxPipeline as it comes (run by this script in --worker mode)
  diffusers-compile               + torch.compile of the transformer and of vae.decode (fullgraph, default mode)
  diffusers-fused-cudnn-compile   + fused q/k/v projections, cuDNN attention and a channels_last VAE, then compile
  reference                       single_file_inference.py
  opt-bf16                        optimized_inference.py with every optimization off except bf16 RoPE (and
                                  regional compilation and fp8's fused quant, which need compile or fp8)
  opt+fused-qkv .. opt+attention  the ladder: each rung switches on one more optimization (see LADDER); the last
                                  rung is the whole optimized script at the same T5 length as every row above
  opt-text128 .. opt-text512      the whole optimized script at a fixed T5 length of 128 .. 512 tokens (a bucket)
  opt-cp2, opt-cp4                the whole optimized script under torchrun: context parallelism over 2 or 4 GPUs
  para-attn-cp2, para-attn-cp4    the same for ParaAttention (below); a row needing more GPUs than there are fails
  opt-fp8, opt-fp8-keep1          the whole optimized script with fp8 linear layers (--quantize fp8), and with the
                                  first and last block kept in bf16; % of roofline is against the bf16 matmul rate
  opt-fp8-unfused                 opt-fp8 without its one-pass Triton kernels before each fp8 matmul
                                  (--no-fp8-fused-quant: inductor's fusion of the same ops), for the A/B
  opt-attn8, opt-fp8-attn8        8-bit attention (--attention cudnn-fp8; Hopper, nvidia-cudnn-frontend) with bf16
                                  and with fp8 linear layers
  xdit, para-attn, cache-dit      the peers, each set up as its documentation sets up FLUX.1-dev on one GPU, on the
                                  diffusers rows' pipeline and timed the same way (peers.py; optional packages,
                                  requirements-peers.txt); a peer not installed is a failed row
  para-attn-fbcache,              the peers' caches: they skip work on some steps and change the image
  cache-dit-dbcache

Lossy rows (fp8, the caches) change the image: every output labels them, and the table lists them apart.

Wall time per row on an H100 at the defaults: about 1 minute for an eager row (building the model, a warm-up and
three runs); the compiled rows (diffusers-compile, diffusers-fused-cudnn-compile, opt+compile and every opt row
after it) add 2.5-4 minutes of compilation each, since no row reuses another's cache (H100 estimates; on an H200
the opt+attention and opt-fp8 rows took about 1.5 minutes each with regional compilation, runs 21-22). The 21 bf16
rows and the fp8 rows together take over an hour; pick rows with --configs for less.

Before the rows, on a GPU, the roofline is measured in this process: the bf16 matmul rate at FLUX's shapes and
the attention rate of the cuDNN and flash kernels. Each row then reports its achieved TFLOP/s in the denoiser and
that as a share of the roofline, besides images per hour and the cost of 1000 images at --price-per-hour.

Outputs in --out-dir: results.json (every number, the environment and the command line), results.md (the table,
also printed) and results.png (denoiser and end-to-end time per row).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.nn.attention import SDPBackend, sdpa_kernel

import peers
from single_file_inference import (
    CLIP_L_CONFIG,
    CONFIGS,
    FLUX_DEV_SCHEDULER,
    FLUX_VAE_CONFIG,
    T5_XXL_CONFIG,
    Timer,
    UserError,
    check_common_args,
    default_dtype,
    init_random_,
    read_json,
    summarize,
    sync,
)

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.basename(__file__)
DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
STAGES = ("text_encoders", "denoiser", "vae", "end_to_end")

# --smoke: a seconds-long run of the plumbing on the CPU, for a tiny pipeline (tiny_pipeline.py), whose VAE
# downsamples by 4, so sizes are multiples of 8.
SMOKE = dict(device="cpu", dtype="float32", steps=2, runs=2, warmup=0, height=40, width=56, max_sequence_length=32)


# ----------------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One configuration: the script its subprocess runs, the row's own flags, a fixed T5 length if any, whether it
    changes the image (fp8, caches) and the peer package it runs, whose version the results record."""

    script: str
    flags: tuple[str, ...] = ()
    text_tokens: int | None = None  # None: --max-sequence-length
    lossy: bool = False
    package: str | None = None
    nproc: int = 1  # processes under torchrun, one GPU each (context parallelism)


DIFFUSERS_ROWS = ("diffusers-eager", "diffusers-compile", "diffusers-fused-cudnn-compile")
WORKERS = (*DIFFUSERS_ROWS, *peers.PEERS)  # the rows this script runs itself, in --worker mode

# The optimized ladder. Each rung drops the flags beside it, which switch its optimization off, and keeps those of
# the rungs below it; so a rung has its own optimization and those of every rung above it. Text buckets stay off on
# every rung, so that all rows of the ladder, the reference and the peers run the same T5 length.
LADDER = {
    "opt-bf16": (),  # bf16 RoPE is the one optimization left on at the bottom of the ladder
    "opt+fused-qkv": ("--no-fused-qkv",),
    "opt+euler-in-graph": ("--no-euler-in-graph",),
    "opt+precompute": ("--no-precompute",),
    "opt+compile": ("--no-compile", "--no-channels-last-vae"),  # channels-last VAE rides on this rung
    "opt+cuda-graphs": ("--no-cuda-graphs",),
    "opt+rope-halves": ("--no-rope-halves",),
    "opt+rope-per-stream": ("--no-rope-per-stream",),
    "opt+sigmoid-gelu": ("--no-sigmoid-gelu",),
    "opt+uint8-on-gpu": ("--no-uint8-on-gpu", "--no-deferred-vae"),  # the VAE's build moves load time, not a run's
    "opt+attention": ("--attention", "sdpa"),  # back to --attention auto: the kernel chosen per GPU architecture
}


def ladder_rows() -> dict[str, Row]:
    rungs = list(LADDER)
    rows = {}
    for i, name in enumerate(rungs):
        still_off = [flag for later in rungs[i + 1:] for flag in LADDER[later]]
        rows[name] = Row("optimized_inference.py", (*still_off, "--no-text-buckets"))
    return rows


ROWS = {
    **{name: Row(SCRIPT, ("--worker", name)) for name in DIFFUSERS_ROWS},
    "reference": Row("single_file_inference.py"),
    **ladder_rows(),
    # A text bucket is a fixed T5 length; buckets off, so the length is exactly the one given.
    **{f"opt-text{n}": Row("optimized_inference.py", ("--no-text-buckets",), text_tokens=n)
       for n in (128, 256, 384, 512)},
    # The whole step as one compiled graph instead of one graph per block kind: fusion across blocks, longer compile.
    "opt-whole-step": Row("optimized_inference.py", ("--no-text-buckets", "--no-regional-compile")),
    # Inductor's coordinate-descent and GEMM autotuning (opt-in: more compile time).
    "opt-tuned": Row("optimized_inference.py", ("--no-text-buckets", "--inductor-tuning")),
    # Context parallelism over N GPUs, ours and ParaAttention's (which its docs show under torchrun).
    **{name: replace(row, nproc=n) for n in (2, 4)
       for name, row in ((f"opt-cp{n}", ladder_rows()["opt+attention"]),
                         (f"para-attn-cp{n}", Row(SCRIPT, ("--worker", "para-attn"), package="para-attn")))},
    # The peers, lossless (peers.py).
    **{name: Row(SCRIPT, ("--worker", name), package=peer.package)
       for name, peer in peers.PEERS.items() if not peer.lossy},
    # fp8 linear layers in the blocks (opt-in, needs compute capability 8.9+); "keep1": first and last block in bf16.
    "opt-fp8": Row("optimized_inference.py", ("--no-text-buckets", "--quantize", "fp8"), lossy=True),
    "opt-fp8-keep1": Row("optimized_inference.py", ("--no-text-buckets", "--quantize", "fp8", "--fp8-keep-bf16", "1"),
                         lossy=True),
    "opt-fp8-unfused": Row("optimized_inference.py", ("--no-text-buckets", "--quantize", "fp8", "--no-fp8-fused-quant"),
                           lossy=True),
    # 8-bit attention (opt-in, lossy; Hopper, attention_fp8.py), with bf16 and with fp8 linear layers.
    "opt-attn8": Row("optimized_inference.py", ("--no-text-buckets", "--attention", "cudnn-fp8"), lossy=True),
    "opt-fp8-attn8": Row("optimized_inference.py",
                         ("--no-text-buckets", "--quantize", "fp8", "--attention", "cudnn-fp8"), lossy=True),
    # The peers' caches, next to our fp8 rows.
    **{name: Row(SCRIPT, ("--worker", name), lossy=True, package=peer.package)
       for name, peer in peers.PEERS.items() if peer.lossy},
}


# ----------------------------------------------------------------------------------------------------------------------
# FLOP model and roofline
# ----------------------------------------------------------------------------------------------------------------------
def flop_per_step(height: int, width: int, text_tokens: int, batch: int = 1, hidden: int = 3072, blocks: int = 57,
                  vae_scale_factor: int = 8) -> tuple[float, float]:
    """FLOP of one denoising step (one transformer forward pass), as (linear layers, attention).

    The sequence is S = L_img + L_txt tokens, with one image token per 2x2 patch of latents. Every block does 12 d^2
    multiply-adds per token in its linear layers, i.e. 24 d^2 S FLOP: a double block, per token of each of its two
    streams, 3 d^2 for q/k/v, d^2 for the attention output and 8 d^2 for the MLP (d -> 4d -> d); a single block
    7 d^2 for its fused q/k/v + MLP input projection and 5 d^2 for its output projection (5d -> d). Attention adds
    4 S^2 d FLOP per block (q k^T and the weighted sum of v, 2 S^2 d each). The embedders, the adaLN modulations
    (per sample, not per token), norms and RoPE are left out: well under 1% at FLUX's sizes.
    """
    image_tokens = (height // (vae_scale_factor * 2)) * (width // (vae_scale_factor * 2))
    s = image_tokens + text_tokens
    linear = 24 * hidden**2 * s * blocks * batch
    attention = 4 * s**2 * hidden * blocks * batch
    return float(linear), float(attention)


def model_sizes(model: str, random_weights: bool) -> dict[str, int]:
    """The sizes flop_per_step needs: from a local pipeline's configs, else FLUX.1's (all FLUX.1 models share them)."""
    if random_weights or not os.path.isdir(model):
        cfg = CONFIGS["flux-dev"]
        return dict(hidden=cfg.hidden_size, blocks=cfg.num_layers + cfg.num_single_layers,
                    vae_scale_factor=2 ** (len(FLUX_VAE_CONFIG["block_out_channels"]) - 1))
    transformer = read_json(os.path.join(model, "transformer", "config.json"))
    vae = read_json(os.path.join(model, "vae", "config.json"))
    return dict(hidden=transformer["num_attention_heads"] * transformer["attention_head_dim"],
                blocks=transformer["num_layers"] + transformer["num_single_layers"],
                vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1))


# FLUX's matmuls at 1024x1024 with 512 text tokens (M = 4608 tokens): fused q/k/v, MLP up, MLP down, a single
# block's fused q/k/v + MLP input, and a single block's output projection.
MATMUL_SHAPES = ((4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504),
                 (4608, 15360, 3072))
ATTENTION_SHAPE = (1, 24, 4608, 128)  # [batch, heads, tokens, head dim]


def cuda_seconds(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median GPU time of fn(), each call timed between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def measure_roofline(device: torch.device, dtype: torch.dtype) -> dict:
    """What this GPU reaches on the denoiser's two kinds of work alone, in TFLOP/s.

    Inputs are random, never zeros: on zeros the tensor cores draw less power and clock higher than on real data.
    """
    matmul = {}
    for m, k, n in MATMUL_SHAPES:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        matmul[f"[{m}x{k}]@[{k}x{n}]"] = 2 * m * k * n / cuda_seconds(functools.partial(torch.matmul, a, b)) / 1e12
    batch, heads, tokens, head_dim = ATTENTION_SHAPE
    q, k, v = (torch.randn(ATTENTION_SHAPE, device=device, dtype=dtype) for _ in range(3))
    attention = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                seconds = cuda_seconds(functools.partial(F.scaled_dot_product_attention, q, k, v))
        except RuntimeError:  # this GPU, dtype or torch build has no such kernel
            continue
        attention[name] = 4 * batch * heads * tokens**2 * head_dim / seconds / 1e12
    return {"matmul_tflops": matmul, "attention_tflops": attention,
            "matmul_median_tflops": statistics.median(matmul.values()),
            "attention_best_tflops": max(attention.values(), default=None)}


# ----------------------------------------------------------------------------------------------------------------------
# diffusers' FluxPipeline and the peers on it, timed like our scripts (this script's --worker mode)
# ----------------------------------------------------------------------------------------------------------------------
def random_flux_pipeline(device: torch.device, dtype: torch.dtype):
    """A full-size FLUX.1-dev FluxPipeline with random weights, built in `dtype` directly on `device`.

    Built in the target dtype: a float32 detour would not fit on an 80 GB card next to the rest. The tokenizers are
    tiny_pipeline's offline ones; their token ids fall inside the real vocabularies, which is all that timing with
    random weights needs.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tiny_pipeline import make_clip_tokenizer, make_t5_tokenizer

    with tempfile.TemporaryDirectory() as tmp:  # the tokenizers are read into memory
        clip_tokenizer = make_clip_tokenizer(os.path.join(tmp, "clip"))
        t5_tokenizer = make_t5_tokenizer(os.path.join(tmp, "t5"))
    cfg = CONFIGS["flux-dev"]  # its transformer fields carry diffusers' config names
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            in_channels=cfg.in_channels, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
            attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.joint_attention_dim, pooled_projection_dim=cfg.pooled_projection_dim,
            guidance_embeds=cfg.guidance_embeds, axes_dims_rope=cfg.axes_dims_rope,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    # The library's default init blows the residual stream up to inf within 57 blocks; use the reference's random
    # weights instead: every linear N(0, 1/fan_in), then the adaLN projections scaled down by 10 (the reference's
    # helper does that for its own adaLN class; diffusers has three).
    init_random_(transformer)
    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)):
                module.linear.weight.mul_(0.1)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae,
                        text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=t5_tokenizer, transformer=transformer)


@torch.no_grad()  # as FluxPipeline.__call__ is; encode_prompt and the decode below are outside it
def peer_generate(pipe, args, timer: Timer, before_request=None) -> torch.Tensor:
    """One image (batch) through FluxPipeline, timed in the same four spans as our scripts; returns the latents.

    before_request: what a peer does before each call of the pipeline (peers.Peer.setup), inside the timing."""
    with timer("end_to_end"):
        if before_request is not None:
            before_request()
        with timer("text_encoders"):
            prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
                args.prompt, prompt_2=None, num_images_per_prompt=args.batch_size,
                max_sequence_length=args.max_sequence_length)
        with timer("denoiser"):
            latents = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                           height=args.height, width=args.width, num_inference_steps=args.steps,
                           guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length,
                           generator=torch.Generator("cpu").manual_seed(args.seed), output_type="latent").images
        with timer("vae"):  # what FluxPipeline does after the loop when asked for images
            image = pipe._unpack_latents(latents, args.height, args.width, pipe.vae_scale_factor)
            image = image / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(image, return_dict=False)[0]
            pipe.image_processor.postprocess(image, output_type="pil")
    return latents


def run_peer(args) -> int:
    """--worker mode: time one diffusers configuration or peer and write the same timings JSON as our scripts."""
    from diffusers import FluxPipeline

    peer = peers.PEERS.get(args.worker)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if args.random_weights:
        pipe = random_flux_pipeline(device, dtype)
    else:
        pipe = FluxPipeline.from_pretrained(args.model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.worker == "diffusers-fused-cudnn-compile":
        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.set_attention_backend("_native_cudnn")
        pipe.vae.to(memory_format=torch.channels_last)
    if args.worker in ("diffusers-compile", "diffusers-fused-cudnn-compile"):
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True)
    before_request = peer.setup(pipe, args) if peer is not None else None

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        peer_generate(pipe, args, Timer(device), before_request)
    sync(device)
    warmup_s = time.perf_counter() - t0
    per_run = []
    for _ in range(args.runs):
        timer = Timer(device)
        latents = peer_generate(pipe, args, timer, before_request)
        per_run.append(timer.seconds())
    if not torch.isfinite(latents).all():  # random weights must behave like a model, or the timings mean little
        raise RuntimeError("NaN/Inf in the latents after denoising")
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 reports as our scripts do
        with open(args.timings_json, "w") as f:
            cached = peer.cached_steps(pipe) if peer is not None and peer.cached_steps else None
            json.dump({"script": f"{SCRIPT} --worker {args.worker}", "args": vars(args),
                       **summarize(per_run, warmup_s, device), "cached_steps": cached}, f, indent=1)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Running a row
# ----------------------------------------------------------------------------------------------------------------------
def row_command(row: Row, args, scratch: str) -> list[str]:
    launcher = [sys.executable]
    if row.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={row.nproc}"]
    cmd = [*launcher, os.path.join(REPO_DIR, row.script), *row.flags,
           "--model", args.model, "--prompt", args.prompt, "--height", str(args.height), "--width", str(args.width),
           "--steps", str(args.steps), "--guidance", str(args.guidance), "--seed", str(args.seed),
           "--max-sequence-length", str(row.text_tokens or args.max_sequence_length),
           "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype,
           "--warmup", str(args.warmup), "--runs", str(args.runs),
           "--timings-json", os.path.join(scratch, "timings.json")]
    if args.random_weights:
        cmd.append("--random-weights")
    if row.script != SCRIPT:  # our scripts save the image they draw; into the scratch folder, which goes away
        cmd += ["--output", os.path.join(scratch, "image.png")]
    return cmd


def error_line(path: str, start: int) -> str:
    """A failed row's error, from its log from byte `start` on: the last exception line of a traceback (torchrun
    prefixes "[rank0]: ", and warnings printed at exit can follow it), else the last non-empty line."""
    with open(path, errors="replace") as f:
        f.seek(start)
        lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in f.read().splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if re.match(r"([\w.]+(Error|Exception|Interrupt)|error): ", line)]
    return (errors or lines or [""])[-1]


def too_few_gpus(row: Row, args) -> str | None:
    """Why a context-parallel row cannot run on this machine, or None."""
    gpus = torch.cuda.device_count()
    if row.nproc > 1 and torch.device(args.device).type == "cuda" and gpus < row.nproc:
        return f"needs {row.nproc} GPUs, this machine has {gpus}"
    return None


def run_row(name: str, row: Row, args) -> dict:
    """Run one configuration in a fresh process: its timings JSON, or None and why it failed."""
    log_path = os.path.join(args.out_dir, f"{name}.log")
    missing = (row.package and peers.not_installed(row.package)) or too_few_gpus(row, args)
    if missing:  # failed at once, not after the minute its process would spend building the model
        with open(log_path, "w") as log:
            print(missing, file=log)
        return {"command": None, "log": log_path, "wall_s": 0.0, "timings": None, "error": missing}
    with tempfile.TemporaryDirectory(prefix="flux-benchmark-") as scratch:
        cmd = row_command(row, args, scratch)
        env = {
            **os.environ,
            # Inductor and Triton keep compiled kernels on disk across processes: a private cache per row, so no
            # row skips compilation that an earlier one paid for.
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor"),
            "TRITON_CACHE_DIR": os.path.join(scratch, "triton"),
            "PYTHONUNBUFFERED": "1",  # a row killed at its timeout still leaves its whole log
        }
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            print("$", shlex.join(cmd), file=log, flush=True)
            output_start = log.tell()
            try:
                returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:  # subprocess.run has killed it
                returncode = None
        wall_s = time.perf_counter() - t0
        timings_path = os.path.join(scratch, "timings.json")
        timings = read_json(timings_path) if returncode == 0 and os.path.exists(timings_path) else None
    if returncode is None:
        error = f"timed out after {args.timeout} s"
    elif timings is None:
        error = error_line(log_path, output_start) or f"exit status {returncode}"
    else:
        error = None
    return {"command": shlex.join(cmd), "log": log_path, "wall_s": wall_s, "timings": timings,
            "error": error}


def row_record(name: str, row: Row, run: dict, args, sizes: dict, roofline: dict | None) -> dict:
    """One row of results.json: the timings and everything derived from them (None where not measured)."""
    text_tokens = row.text_tokens or args.max_sequence_length
    linear, attention = flop_per_step(args.height, args.width, text_tokens, args.batch_size, **sizes)
    record = {"config": name, "status": "failed" if run["error"] else "ok", "error": run["error"],
              "lossy": row.lossy, "package": row.package,
              "package_version": peers.package_version(row.package) if row.package else None,
              "text_tokens": text_tokens, "flop_per_step": {"linear": linear, "attention": attention},
              **{stage: None for stage in STAGES}, "warmup_s": None, "peak_mem_GiB": None, "achieved_tflops": None,
              "roofline_s": None, "roofline_pct": None, "images_per_hour": None, "cost_per_1000_images": None,
              "cached_steps": None, "runs": None, "command": run["command"], "log": run["log"], "wall_s": run["wall_s"]}
    timings = run["timings"]
    if timings is None:
        return record
    record.update({stage: timings[stage] for stage in STAGES})
    record.update(warmup_s=timings["warmup_s"], peak_mem_GiB=timings.get("peak_mem_GiB"), runs=timings["runs"],
                  cached_steps=timings.get("cached_steps"))
    denoiser, end_to_end = timings["denoiser"]["median"], timings["end_to_end"]["median"]
    record["achieved_tflops"] = args.steps * (linear + attention) / denoiser / 1e12
    if roofline and roofline["attention_best_tflops"]:
        record["roofline_s"] = args.steps * (linear / roofline["matmul_median_tflops"]
                                             + attention / roofline["attention_best_tflops"]) / 1e12
        record["roofline_pct"] = 100 * record["roofline_s"] / denoiser
    record["images_per_hour"] = 3600 * args.batch_size / end_to_end
    record["cost_per_1000_images"] = args.price_per_hour / record["images_per_hour"] * 1000
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------
def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def environment(args, argv: list[str]) -> dict:
    cuda = torch.device(args.device).type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(args.device) if cuda else None,
        "driver": nvidia_driver() if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "diffusers": importlib.metadata.version("diffusers"),
        "transformers": importlib.metadata.version("transformers"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", SCRIPT, *argv]),
    }


def report_title(args, gpu: str | None) -> str:
    model = "FLUX.1-dev with random weights" if args.random_weights else args.model
    return (f"{model}: {args.width}x{args.height}, {args.steps} steps, batch {args.batch_size}, "
            f"{args.max_sequence_length} text tokens, {args.dtype}, on {gpu or args.device.upper()}")


COLUMNS = ("config", "text enc s", "denoiser s", "VAE s", "e2e s", "warm-up s", "peak GiB", "TFLOP/s", "% roofline",
           "img/h", "$/1000 img")


def cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def label(row: dict) -> str:
    """A row's name as every report shows it: lossy rows say so."""
    return row["config"] + (" (lossy)" if row["lossy"] else "")


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r["status"] == "ok":
            cells = [label(r), *(cell(r[stage]["median"], ".2f") for stage in STAGES),
                     cell(r["warmup_s"], ".1f"), cell(r["peak_mem_GiB"], ".1f"), cell(r["achieved_tflops"], ".3g"),
                     cell(r["roofline_pct"], ".0f", "%"), cell(r["images_per_hour"], ".0f"),
                     cell(r["cost_per_1000_images"], ".2f")]
        else:
            error = r["error"].replace("|", "\\|")
            cells = [label(r), f"failed: {error}", *[""] * (len(COLUMNS) - 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    """The table: lossless rows first, then the lossy ones (fp8, 8-bit attention, caches) in a table of their own, so
    that no lossy row sits beside the lossless ones it would seem to beat."""
    settings = results["settings"]
    lossless = [r for r in results["rows"] if not r["lossy"]]
    lossy = [r for r in results["rows"] if r["lossy"]]
    lines = [f"## {results['title']}", ""]
    if lossless and lossy:
        lines += ["Lossless:", ""]
    if lossless:
        lines += table_lines(lossless)
    if lossy:
        lines += ["", "Lossy (these rows change the image: fp8 weights and activations, 8-bit attention, or steps "
                      "skipped by a cache):", "", *table_lines(lossy)]
    lines += ["", f"Median of {settings['runs']} timed run(s) after {settings['warmup']} warm-up run(s) (warm-up s: "
                  "all of these, compilation included); every configuration in its own process."]
    cached = [f"{r['config']} {r['cached_steps']} of {settings['steps']}" for r in results["rows"]
              if r["cached_steps"] is not None]
    if cached:
        lines.append(f"Steps served from a cache in the last timed run: {', '.join(cached)}."
                     + (" With random weights a cache sees other step-to-step changes than with FLUX's own: its "
                        "speed here is not what it gives with real weights." if results["random_weights"] else ""))
    if any(r["text_tokens"] != settings["max_sequence_length"] for r in results["rows"]):
        lines.append("opt-textN rows run N text tokens.")
    roofline = results["roofline"]
    if roofline:
        attention = ", ".join(f"{k} {v:.0f}" for k, v in roofline["attention_tflops"].items())
        lines.append(f"Roofline: matmul {roofline['matmul_median_tflops']:.0f} TFLOP/s (median of FLUX's shapes), "
                     f"attention {attention} TFLOP/s (the best counts).")
    versions = sorted({f"{r['package']} {r['package_version'] or '(not installed)'}"
                       for r in results["rows"] if r["package"]})
    if versions:
        lines.append(f"Peers: {', '.join(versions)}; each on the same FluxPipeline as the diffusers rows (peers.py).")
    lines.append(f"Cost at ${settings['price_per_hour']}/hour.")
    if results["random_weights"]:
        lines.append("Random weights: the timings are those of FLUX.1-dev, the images are noise.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    rows = sorted(results["rows"], key=lambda r: r["lossy"])  # as in the table: the lossy rows last (a stable sort)
    labels = [label(r) + ("" if r["status"] == "ok" else " (failed)") for r in rows]
    # A bare Figure rather than pyplot: no GUI backend to pick and no global state.
    fig = Figure(figsize=(10, 1.5 + 0.5 * len(rows)), layout="constrained")
    ax = fig.subplots()
    y = range(len(rows))
    for offset, stage, legend in ((-0.2, "end_to_end", "end to end"), (0.2, "denoiser", "denoiser")):
        seconds = [r[stage]["median"] if r["status"] == "ok" else 0.0 for r in rows]
        bars = ax.barh([i + offset for i in y], seconds, height=0.4, label=legend)
        ax.bar_label(bars, labels=[f"{s:.2f} s" if s else "" for s in seconds], padding=3, fontsize=8)
    ax.set_yticks(list(y), labels)
    lossless = sum(not r["lossy"] for r in rows)
    if 0 < lossless < len(rows):  # a line between the lossless rows and the lossy ones below them
        ax.axhline(lossless - 0.5, color="gray", linestyle="--", linewidth=0.8)
    ax.invert_yaxis()  # the first row on top, as in the table
    ax.set_xlabel("seconds per image (median)" if results["settings"]["batch_size"] == 1 else "seconds per batch")
    ax.margins(x=0.15)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)  # off the bars
    ax.set_title(results["title"], fontsize=10, wrap=True)
    fig.savefig(path, dpi=150)


def write_outputs(results: dict, out_dir: str) -> str:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(out_dir, "results.png"))
    return table


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"hub id or local diffusers directory; when not given, {DEFAULT_MODEL}'s architecture with "
                        "random weights")
    p.add_argument("--random-weights", action="store_true",
                   help="full-size model with random weights, no download (the timings of the real model)")
    p.add_argument("--configs", default=",".join(ROWS), help="comma-separated rows to run, in this order")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens of every row but opt-textN")
    p.add_argument("--prompt", default="a corgi astronaut on the moon, detailed, cinematic lighting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="images per request, in every row")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation happens here)")
    p.add_argument("--runs", type=int, default=3, help="timed runs; the table shows their medians")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default="results", help="results.json, results.md, results.png and a log per row")
    p.add_argument("--price-per-hour", type=float, default=2.69,
                   help="GPU price in $/hour for the cost column (the blog's Runpod H100 price)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a row may take before it is failed")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long CPU run of the plumbing with a tiny --model (see tiny_pipeline.py): "
                        + ", ".join(f"{k}={v}" for k, v in SMOKE.items()) + ", no roofline")
    # The diffusers and peer rows run this script again as a subprocess in worker mode; not for direct use.
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--timings-json", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:  # the parent has filled in and checked everything
        return args
    if args.smoke:
        if args.model is None:
            parser.error("--smoke needs --model: a small pipeline such as `python tiny_pipeline.py DIR` writes")
        vars(args).update(SMOKE)
    args.random_weights = args.random_weights or args.model is None
    args.model = args.model or DEFAULT_MODEL
    args.configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in args.configs if name not in ROWS]
    if unknown or not args.configs:
        parser.error(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the rows and write the reports; the exit status is 1 if any row failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return run_peer(args)
    try:  # the flags the rows take, checked before any row starts
        check_common_args(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(args.out_dir, exist_ok=True)
    env = environment(args, argv)
    results = {
        "title": report_title(args, env["gpu"]),
        "random_weights": args.random_weights,
        "model": args.model,
        "settings": {k: getattr(args, k) for k in (
            "height", "width", "steps", "guidance", "max_sequence_length", "prompt", "seed", "batch_size", "warmup",
            "runs", "dtype", "device", "price_per_hour", "timeout", "configs")},
        "model_sizes": model_sizes(args.model, args.random_weights),
        "environment": env,
        "roofline": None,
        "rows": [],
    }
    print(results["title"])
    if torch.device(args.device).type == "cuda":
        print("measuring the roofline ...", end=" ", flush=True)
        results["roofline"] = roofline = measure_roofline(torch.device(args.device), getattr(torch, args.dtype))
        torch.cuda.empty_cache()  # hand the memory back before the rows start
        print(f"matmul {roofline['matmul_median_tflops']:.0f} TFLOP/s, attention "
              + ", ".join(f"{k} {v:.0f}" for k, v in roofline["attention_tflops"].items()) + " TFLOP/s")

    width = max(map(len, args.configs))
    for i, name in enumerate(args.configs, 1):
        print(f"[{i}/{len(args.configs)}] {name:<{width}} ...", end=" ", flush=True)
        run = run_row(name, ROWS[name], args)
        record = row_record(name, ROWS[name], run, args, results["model_sizes"], results["roofline"])
        results["rows"].append(record)
        table = write_outputs(results, args.out_dir)  # after every row, so an interrupted run keeps what it has
        if record["status"] == "ok":
            print(f"ok: end to end {record['end_to_end']['median']:.2f} s, denoiser {record['denoiser']['median']:.2f}"
                  f" s ({run['wall_s']:.0f} s for the row)")
        else:
            print(f"FAILED: {record['error']} (see {record['log']})")
    print()
    print(table)
    print(f"wrote {os.path.join(args.out_dir, 'results.json')}, results.md and results.png")
    return 0 if all(r["status"] == "ok" for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
