"""FLUX.1 text-to-image in one readable file: the optimized implementation.

    python optimized_inference.py --prompt "a corgi astronaut on the moon"

The pipeline, top to bottom:
  1. encode the prompt twice: CLIP-L gives one pooled vector, T5-XXL gives a sequence of token embeddings;
  2. draw Gaussian noise in the VAE's latent space and pack it into 2x2 patches, one token each;
  3. integrate the flow-matching ODE from noise (sigma=1) to image (sigma=0) with Euler steps, asking the
     transformer for the velocity at each step;
  4. unpack the latents and decode them to pixels with the VAE.

The transformer and the sampler are written out here; tokenizers, text encoders and the VAE come from
transformers and diffusers. This file mirrors single_file_inference.py section by section, so
`diff single_file_inference.py optimized_inference.py` reads as the list of optimizations. `Options` below is their
index: each is on by default, has a --no-... flag and its reason. What goes beyond one image on one GPU lives in
sibling modules imported only when their flag is used: fp8.py (--quantize fp8), attention_fp8.py (--attention
cudnn-fp8), prompts_file.py (--prompts-file, --offload-text-encoders), precompile.py (--compile-cache's saved
graphs), context_parallel.py (torchrun),
bfl_checkpoint.py (single-file checkpoints), lora.py (--lora), profiling.py (--profile).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FluxConfig:
    # Transformer fields carry diffusers' config.json names, so a checkpoint's config maps onto them one to one.
    in_channels: int = 64
    num_layers: int = 19  # dual-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5 hidden size
    pooled_projection_dim: int = 768  # CLIP pooled size
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # RoPE split of each head over (text index, row, column)
    mlp_ratio: float = 4.0
    rope_theta: int = 10_000
    # Sampling defaults.
    default_steps: int = 28
    default_guidance: float = 3.5
    max_sequence_length: int = 512
    scheduler: dict = field(default_factory=dict)  # diffusers' FlowMatchEulerDiscreteScheduler config

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

CONFIGS = {
    "flux-dev": FluxConfig(scheduler=FLUX_DEV_SCHEDULER),
    "flux-schnell": FluxConfig(
        guidance_embeds=False, default_steps=4, default_guidance=0.0, max_sequence_length=256,
        scheduler=FLUX_SCHNELL_SCHEDULER,
    ),
}


def config_from_checkpoint(transformer_config: dict, scheduler_config: dict) -> FluxConfig:
    """Every size comes from the checkpoint; only the sampling defaults come from the name table."""
    base = CONFIGS["flux-dev" if transformer_config.get("guidance_embeds", False) else "flux-schnell"]
    names = {f.name for f in fields(FluxConfig)}
    sizes = {k: v for k, v in transformer_config.items() if k in names}
    if "axes_dims_rope" in sizes:
        sizes["axes_dims_rope"] = tuple(sizes["axes_dims_rope"])
    if transformer_config.get("patch_size", 1) != 1:
        raise UserError(f"transformer patch_size={transformer_config['patch_size']} is not supported (FLUX uses 1)")
    return FluxConfig(**{**base.__dict__, **sizes, "scheduler": scheduler_config})


# Full-size component configs for --random-weights: FLUX.1's CLIP-L, T5-XXL encoder and 16-channel VAE.
CLIP_L_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
)
T5_XXL_CONFIG = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False,
)
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
)


def optimization(what: str, why: str, exact: bool = True, default=True):
    """An Options field: on by default, `--no-<name>` switches it off. `exact`: the same bf16 numbers as the
    reference (False where the rounding changes: tests/test_numerics.py checks both kinds)."""
    return field(default=default, metadata={"what": what, "why": why, "exact": exact})


@dataclass(frozen=True)
class Options:
    """The optimizations, in the order a step meets them. The `--no-...` flags, their help and the README's table
    (tests/test_optimized.py) come from these fields; describe() reports what the model and its steps show."""

    text_buckets: bool = optimization("T5 length rounded up to a multiple of 128 instead of always 512",
                                      "short prompts attend over fewer tokens, with few shapes to compile", False)
    precompute: bool = optimization(
        "RoPE tables, text projection and all 77 adaLN modulations of every step once per request (`Flux.condition`)",
        "one pass over 6.5 GB of modulation weights per request instead of per step")
    fused_qkv: bool = optimization(
        "q/k/v as one matmul per stream; single blocks: q/k/v and the MLP input as one (`fuse_projections`)",
        "fewer, larger GEMMs read the activations once")
    bf16_rope: bool = optimization("RoPE tables and rotation in bf16",
                                   "the reference rotates q and k in float32: extra copies", False)
    rope_halves: bool = optimization(
        "RoPE pairs channel j with j + 64, not 2j with 2j+1; q/k weights permuted to match (`permute_rope_pairs`)",
        "the norm + RoPE kernel reads two contiguous halves, not neighbours: 186 -> 122 us (run 16)", False)
    rope_per_stream: bool = optimization("double blocks rotate each stream's q/k before joining text and image",
                                         "norm + RoPE write straight into the joint q/k: -30 ms bf16 (run 15)")
    attention: str = optimization("the attention kernel, per GPU architecture (auto: cuDNN on Hopper)",
                                  "on an H200 cuDNN runs at ~565 TFLOP/s, the flash kernel SDPA picks at ~300",
                                  default="auto")
    sigmoid_gelu: bool = optimization(
        "GELU's tanh approximation as x * sigmoid(2u) (`gelu_tanh`)",
        "fp8's GELU + amax + cast kernel was bound by tanh: 341 -> 232 us (run 16); neutral in bf16", False)
    euler_in_graph: bool = optimization("the Euler update inside the graphed step (`euler_step`)",
                                        "no separate kernels or host work per step")
    compile: bool = optimization("torch.compile of the transformer (`optimize`)",
                                 "fuses norms, modulation, RoPE, GELU and residuals into few kernels", False)
    regional_compile: bool = optimization(
        "compile per block (`compile_blocks`): one graph for the 19 double blocks, one for the 38 single ones",
        "50 s warm-up instead of 178 s for the whole step as one graph, 1.8% slower (run 8)")
    dynamic_shapes: bool = optimization(
        "compiled once for every size, T5 length and batch above 1 (`compile_blocks`); each shape captures its graph",
        "a new resolution costs a CUDA graph capture, ~1 s, instead of a compile")
    fp8_fused_quant: bool = optimization(
        "with --quantize fp8: one Triton pass per row before each fp8 matmul: LayerNorm + modulate (and the residual "
        "add before it) or GELU, then the per-token amax and e4m3 cast (`fp8.use_fused_quant_`)",
        "inductor's kernels for these ran at ~3x their memory time or worse (run 16); fp8 2.561 -> 2.452 s, the same "
        "error (run 32)", False)
    cuda_graphs: bool = optimization("the step captured once per shape as a CUDA graph (`CUDAGraphStep`)",
                                     "no per-kernel launch cost, no CPU in the loop")
    deferred_vae: bool = optimization(
        "the VAE left to the first image: diffusers imported in a thread during its denoise, the VAE built after "
        "(`DeferredVAE`)",
        "diffusers' import is seconds of a warm start, which the first denoise hides: 25.4 -> 20.1 s to the first "
        "image (run 43)")
    channels_last_vae: bool = optimization("VAE decoder in channels_last", "its convolutions run faster in NHWC",
                                           False)
    uint8_on_gpu: bool = optimization("decoded pixels rounded to uint8 on the GPU",
                                      "a quarter of the bytes to copy back, no float pass on the CPU")
    # Opt-in: slow to compile, or changes the numbers (fp8.py; --compare-bf16 measures how much).
    inductor_tuning: bool = False
    compile_vae: bool = False  # 1.8% more images/hour in a long run of one size; +53 s cold, +11 s warm (run 25)
    quantize: str = "none"  # "fp8": the blocks' linear layers in float8 e4m3
    fp8_keep_bf16: int = 0  # this many blocks at each end of the 57 stay bf16
    compare_bf16: bool = False  # keep the bf16 model too and report fp8's error against it
    lora: tuple = ()  # ((file, scale), ...) fused into the weights (lora.py)
    lora_swaps: tuple = ()  # LoRA files that --prompts-file lines switch to: their layers' base weights are kept


OPTIMIZATIONS = [f for f in fields(Options) if "why" in f.metadata]


class UserError(Exception):
    """Bad input: reported as one line on stderr with a non-zero exit status."""


# ----------------------------------------------------------------------------------------------------------------------
# Math
# ----------------------------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of a scalar per sample, cos half first (diffusers' flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int, dtype=torch.float32, halves: bool = False):
    """Rotary tables for positions `ids` [S, n_axes]; each axis rotates its own slice of the head dimension.

    Angles in float64 as diffusers computes them, for identical tables (positions are at most a few hundred: float32
    would be off by ~1e-5). Stored in `dtype`; pair j's angle at channels 2j and 2j+1, or with `halves` j and j + D/2.
    """
    freqs = [1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim) for dim in axes_dim]
    angles = torch.cat([torch.outer(ids[:, i].double(), f) for i, f in enumerate(freqs)], dim=-1)  # [S, D/2]
    cos, sin = angles.cos().float(), angles.sin().float()
    spread = (lambda t: torch.cat([t, t], dim=-1)) if halves else (lambda t: t.repeat_interleave(2, dim=-1))
    return spread(cos).to(dtype), spread(sin).to(dtype)  # [S, head_dim] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """Rotate the pairs of x [B, S, H, D] by the angles behind cos/sin [S, D]: consecutive pairs (x[2j], x[2j+1]),
    or with `halves` (x[j], x[j + D/2]): two contiguous slices swapped instead of every element loading its
    neighbour. Scores are sums over q[d] * k[d], so q and k may order their channels any way both share
    (permute_rope_pairs). In the tables' dtype: with bf16 tables no float32 copy of q/k is stored.
    """
    if halves:
        x0, x1 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x1, x0], dim=-1)
    else:
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "sdpa", "fa2", "fa3", "cudnn-fp8")
# --attention auto, fastest first per GPU architecture. Hopper, on an H200 at FLUX's shape: cuDNN 535-607 TFLOP/s,
# FlashAttention-4 444, FlashAttention-2 (SDPA's flash) 301 (BENCHMARKS.md); other GPUs: not measured here. Lossy
# kernels (cudnn-fp8: 8-bit q/k/v, attention_fp8.py) are opt-in only: auto never picks them.
AUTO_ATTENTION = {9: ("cudnn", "fa3", "fa2", "sdpa"), "other": ("fa2", "cudnn", "sdpa")}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full (unmasked) attention over the joint text+image sequence: [B, S, H, D] -> [B, S, H*D].

    The backend is named, not left to SDPA's heuristics, which pick the flash kernel at half cuDNN's rate on Hopper.
    """
    if backend in ("fa2", "fa3"):  # FlashAttention packages take [B, S, H, D] as is
        out = ATTENTION_FUNCS[backend](q, k, v)
        return (out[0] if isinstance(out, tuple) else out).flatten(2)
    if backend == "cudnn-fp8":  # quantizes q/k/v, calls cuDNN's fp8 kernel, returns [B, S, H*D] (attention_fp8.py)
        return ATTENTION_FUNCS[backend](q, k, v)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    if backend == "cudnn":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]
    elif backend == "flash":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


ATTENTION_FUNCS = {}  # kernels outside torch, by --attention name: loaded by resolve_attention


def resolve_attention(backend: str, device: torch.device) -> str:
    """The kernel `backend` names, checked to exist here; `auto`: the first available of AUTO_ATTENTION's list."""
    if device.type != "cuda":
        if backend not in ("auto", "sdpa"):
            raise UserError(f"--attention {backend} needs CUDA")
        return "sdpa"
    major = torch.cuda.get_device_capability(device)[0]
    for name in AUTO_ATTENTION.get(major, AUTO_ATTENTION["other"]) if backend == "auto" else [backend]:
        if name in ("fa2", "fa3"):  # FlashAttention-3's Hopper package, or FlashAttention-2's
            try:
                ATTENTION_FUNCS[name] = importlib.import_module(
                    "flash_attn_interface" if name == "fa3" else "flash_attn").flash_attn_func
            except ImportError:
                continue
        elif name == "cudnn" and not torch.backends.cudnn.is_available():
            continue
        elif name == "cudnn-fp8":  # named only, never in AUTO_ATTENTION: refused here if this GPU cannot run it
            import attention_fp8

            attention_fp8.check_cudnn_fp8_support(device)
            ATTENTION_FUNCS[name] = attention_fp8.attention
        return name
    raise UserError(f"--attention {backend} is not available here (FlashAttention needs the flash-attn package)")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: normalize without affine weights, then scale and shift per sample from the conditioning vector."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def add_modulate(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                 scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated residual add, and the next layer's input made from its result: (x + gate y, modulate(that))."""
    x = x + gate[:, None] * y
    return x, modulate(x, shift, scale)


def cat_act(attn: torch.Tensor, mlp: torch.Tensor, act) -> torch.Tensor:
    """The single blocks' output projection input: [attention | act(MLP input)]."""
    return torch.cat([attn, act(mlp)], dim=-1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, 0.5 x (1 + tanh(u)), written as x * sigmoid(2u): the same function without tanh,
    whose libdevice form (dozens of instructions) bound fp8's GELU + amax + cast kernel, which evaluates GELU twice
    per element. Computed in float32 and rounded once, as F.gelu does."""
    xf = x.float()
    return (xf * torch.sigmoid(math.sqrt(8 / math.pi) * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of q/k per head: x / sqrt(mean(x^2) + eps) * weight. torch's op accumulates in float32 and runs as
    one kernel on the GPU; the same op diffusers uses, so bf16 results match it bit for bit."""
    return F.rms_norm(x, weight.shape, weight, eps)


def latent_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent height/width for an image size; each latent 2x2 patch becomes one transformer token."""
    return 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4]: one token per 2x2 patch."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H/2 * W/2, C*4] -> [B, C, H, W], the inverse of `pack` for a latent grid of h x w."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """RoPE positions of the image tokens: (0, row, column) per 2x2 patch, row-major. [h/2 * w/2, 3]"""
    rows = torch.arange(h // 2, device=device)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def flow_match_sigmas(steps: int, image_seq_len: int, scheduler: dict) -> torch.Tensor:
    """Noise levels from 1 to 0 in `steps` Euler steps, as FlowMatchEulerDiscreteScheduler computes them for FLUX.

    Evenly spaced sigmas are bent towards high noise; with dynamic shifting the bend grows with the number of image
    tokens (mu is linear in the sequence length), because large images need more steps at high noise.
    """
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if scheduler.get("use_dynamic_shifting", False):
        base_len, max_len = scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 4096)
        base_shift, max_shift = scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = image_seq_len * m + (base_shift - m * base_len)
        if scheduler.get("time_shift_type", "exponential") == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        shift = scheduler.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    unsupported = [k for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                               "invert_sigmas", "stochastic_sampling") if scheduler.get(k)]
    if unsupported:
        raise UserError(f"scheduler options not supported: {', '.join(unsupported)}")
    sigmas = torch.from_numpy(np.asarray(sigmas)).float()
    return torch.cat([sigmas, torch.zeros(1)])  # [steps + 1], ends at 0


# ----------------------------------------------------------------------------------------------------------------------
# Modules (attribute names follow diffusers' state-dict keys, so its checkpoints load as they are)
# ----------------------------------------------------------------------------------------------------------------------
class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; diffusers calls it TimestepEmbedding / PixArtAlphaTextProjection."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """The conditioning vector: embedding(timestep) + embedding(guidance) + projection(CLIP pooled)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, cfg.hidden_size)
        if cfg.guidance_embeds:
            self.guidance_embedder = MLPEmbedder(256, cfg.hidden_size)
        self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, cfg.hidden_size)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        dtype = pooled.dtype
        vec = self.timestep_embedder(timestep_embedding(timestep).to(dtype))
        if guidance is not None:
            vec = vec + self.guidance_embedder(timestep_embedding(guidance).to(dtype))
        return vec + self.text_embedder(pooled)  # [B, hidden]


class AdaNorm(nn.Module):
    """Projects SiLU(conditioning vector) to `n` per-sample shift/scale/gate vectors."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)
        self.n = n

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(vec))  # [B, n * dim], chunked by the block that owns it


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight)


gelu_reference = functools.partial(F.gelu, approximate="tanh")  # --no-sigmoid-gelu


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, opts: Options):
        super().__init__()
        # Index 1 is diffusers' dropout slot: kept empty so the keys read ff.net.0.proj / ff.net.2.
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim)])
        self.net[0].proj = nn.Linear(dim, hidden)
        self.act = gelu_tanh if opts.sigmoid_gelu else gelu_reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.act(self.net[0].proj(x)))


class DoubleAttention(nn.Module):
    """Joint attention with separate projections for the image stream and the text ("added") stream."""

    def __init__(self, dim: int, head_dim: int, opts: Options):
        super().__init__()
        self.head_dim, self.fused, self.per_stream = head_dim, opts.fused_qkv, opts.rope_per_stream
        self.halves = opts.rope_halves
        self.attend = attention  # the model's attention kernel: Flux.set_attention
        if self.fused:  # filled by fuse_projections() at load time
            self.to_qkv, self.to_added_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        else:
            self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = QKNorm(head_dim), QKNorm(head_dim)
        self.norm_added_q, self.norm_added_k = QKNorm(head_dim), QKNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, img, txt, pe):
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731  [B, S, H*D] -> [B, S, H, D]
        if self.fused:
            iq, ik, iv = heads(self.to_qkv(img)).chunk(3, dim=2)
            tq, tk, tv = heads(self.to_added_qkv(txt)).chunk(3, dim=2)
        else:
            iq, ik, iv = heads(self.to_q(img)), heads(self.to_k(img)), heads(self.to_v(img))
            tq, tk, tv = heads(self.add_q_proj(txt)), heads(self.add_k_proj(txt)), heads(self.add_v_proj(txt))
        rot = functools.partial(apply_rope, halves=self.halves)
        if self.per_stream:  # compiled, each stream's norm + RoPE is one kernel writing straight into the joint q/k
            txt_pe, img_pe = zip(*(t.split([tq.shape[1], iq.shape[1]]) for t in pe), strict=True)
            q = torch.cat([rot(self.norm_added_q(tq), *txt_pe), rot(self.norm_q(iq), *img_pe)], dim=1)
            k = torch.cat([rot(self.norm_added_k(tk), *txt_pe), rot(self.norm_k(ik), *img_pe)], dim=1)
        else:
            q = rot(torch.cat([self.norm_added_q(tq), self.norm_q(iq)], dim=1), *pe)
            k = rot(torch.cat([self.norm_added_k(tk), self.norm_k(ik)], dim=1), *pe)
        v = torch.cat([tv, iv], dim=1)
        out = self.attend(q, k, v)  # [B, L_txt + L_img, hidden]
        txt_out, img_out = out.split([tq.shape[1], iq.shape[1]], dim=1)
        return self.to_out[0](img_out), self.to_add_out(txt_out)


class DoubleStreamBlock(nn.Module):
    """Image and text tokens keep their own weights but attend jointly (MMDiT)."""

    def __init__(self, cfg: FluxConfig, opts: Options):
        super().__init__()
        dim, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = DoubleAttention(dim, cfg.attention_head_dim, opts)
        self.ff, self.ff_context = FeedForward(dim, hidden, opts), FeedForward(dim, hidden, opts)
        # What makes a linear layer's input from the residual stream; with --quantize fp8, functions that also
        # quantize it for the fp8 matmul, in one pass per row (fp8.use_fused_quant_; --no-fp8-fused-quant).
        self.modulate, self.add_modulate = modulate, add_modulate

    def forward(self, img, txt, mod, pe):
        img_mod, txt_mod = mod.chunk(2, dim=-1)  # this block's slice of the precomputed modulations
        shift1, scale1, gate1, shift2, scale2, gate2 = img_mod.chunk(6, dim=-1)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = txt_mod.chunk(6, dim=-1)
        img_attn, txt_attn = self.attn(self.modulate(img, shift1, scale1), self.modulate(txt, c_shift1, c_scale1), pe)
        img, img_in = self.add_modulate(img, gate1, img_attn, shift2, scale2)  # img + gate1 img_attn, modulated
        img = img + gate2[:, None] * self.ff(img_in)
        txt, txt_in = self.add_modulate(txt, c_gate1, txt_attn, c_shift2, c_scale2)
        txt = txt + c_gate2[:, None] * self.ff_context(txt_in)
        return img, txt


class SingleAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int, opts: Options):
        super().__init__()
        self.head_dim, self.halves = head_dim, opts.rope_halves
        self.attend = attention  # the model's attention kernel: Flux.set_attention
        if not opts.fused_qkv:
            self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = QKNorm(head_dim), QKNorm(head_dim)

    def forward(self, q, k, v, pe):  # the projections are the block's (fused with its MLP input)
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731
        q, k, v = self.norm_q(heads(q)), self.norm_k(heads(k)), heads(v)
        return self.attend(apply_rope(q, *pe, self.halves), apply_rope(k, *pe, self.halves), v)


class SingleStreamBlock(nn.Module):
    """One stream over the joined text+image sequence; attention and MLP run in parallel off the same input."""

    def __init__(self, cfg: FluxConfig, opts: Options):
        super().__init__()
        dim, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.fused, self.dim, self.act = opts.fused_qkv, dim, gelu_tanh if opts.sigmoid_gelu else gelu_reference
        self.norm = AdaNorm(dim, 3)
        self.attn = SingleAttention(dim, cfg.attention_head_dim, opts)
        if self.fused:  # q, k, v and the MLP input read the same activations: one [dim, 3 dim + hidden] matmul
            self.to_qkv_mlp = nn.Linear(dim, 3 * dim + hidden)
        else:
            self.proj_mlp = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(dim + hidden, dim)
        self.modulate, self.cat_act = modulate, cat_act  # fp8: quantizing versions (as in DoubleStreamBlock)

    def forward(self, x, mod, pe):
        shift, scale, gate = mod.chunk(3, dim=-1)
        h = self.modulate(x, shift, scale)
        if self.fused:
            q, k, v, mlp = self.to_qkv_mlp(h).split([self.dim, self.dim, self.dim, self.to_qkv_mlp.out_features
                                                     - 3 * self.dim], dim=-1)
        else:
            q, k, v, mlp = self.attn.to_q(h), self.attn.to_k(h), self.attn.to_v(h), self.proj_mlp(h)
        return x + gate[:, None] * self.proj_out(self.cat_act(self.attn(q, k, v, pe), mlp, self.act))


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig, opts: Options):
        super().__init__()
        self.cfg, self.opts = cfg, opts
        dim = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(cfg, opts) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(cfg, opts) for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaNorm(dim, 2)
        self.proj_out = nn.Linear(dim, cfg.in_channels)
        # Every adaLN projection, in the order forward() consumes them from one concatenated modulation vector.
        self.ada_norms = [m for b in self.transformer_blocks for m in (b.norm1, b.norm1_context)]
        self.ada_norms += [b.norm for b in self.single_transformer_blocks] + [self.norm_out]
        self.set_attention(functools.partial(attention, backend=opts.attention))

    def set_attention(self, attend) -> None:
        """One attention function for every block; one object, so the blocks still share their compiled graphs."""
        for module in self.modules():
            if isinstance(module, (DoubleAttention, SingleAttention)):
                module.attend = attend

    def condition(self, txt, txt_ids, img_ids, timestep, guidance, pooled) -> dict[str, torch.Tensor]:
        """Everything the blocks need that does not depend on the latents: one call can serve all steps.

        timestep/guidance/pooled are [N] / [N] / [N, 768] with N = steps * batch when precomputing for a request.
        """
        # Trained with timesteps and guidance in [0, 1000]; scaled in the model dtype, as diffusers does.
        dtype = pooled.dtype
        vec = self.time_text_embed(timestep.to(dtype) * 1000, None if guidance is None else guidance.to(dtype) * 1000,
                                   pooled)
        # One [N, sum of n * dim] matrix: all 77 adaLN projections of all steps in one pass over their weights.
        mods = torch.cat([norm(vec) for norm in self.ada_norms], dim=-1)
        rope_dtype = dtype if self.opts.bf16_rope else torch.float32
        cos, sin = rope(torch.cat([txt_ids, img_ids]), self.cfg.axes_dims_rope, self.cfg.rope_theta, rope_dtype,
                        self.opts.rope_halves)
        return {"txt": self.context_embedder(txt).clone(), "mods": mods, "cos": cos, "sin": sin}  # clone: forward

    def forward(self, img, txt, mods, cos, sin) -> torch.Tensor:
        """Velocity for packed latents img [B, L_img, C*4], given the output of condition() for this step."""
        # A tensor of its own, not the matmul's view of one: with dynamic shapes dynamo guards on a view's base, and
        # the first block would compile graphs of its own for that (a 25 MB copy per step at 1024x1024).
        img, pe = self.x_embedder(img).clone(), (cos, sin)  # [B, L_img, hidden]
        dim, n_double = self.cfg.hidden_size, len(self.transformer_blocks)
        # Per double block [image 6 dim | text 6 dim], per single block 3 dim, then the final norm's 2 dim.
        mods = mods.split([12 * dim] * n_double + [3 * dim] * len(self.single_transformer_blocks) + [2 * dim], dim=-1)
        for block, mod in zip(self.transformer_blocks, mods[:n_double], strict=True):
            img, txt = block(img, txt, mod, pe)
        x = torch.cat([txt, img], dim=1)  # [B, L_txt + L_img, hidden]
        for block, mod in zip(self.single_transformer_blocks, mods[n_double:-1], strict=True):
            x = block(x, mod, pe)
        img = x[:, txt.shape[1]:]
        scale, shift = mods[-1].chunk(2, dim=-1)  # diffusers' AdaLayerNormContinuous order: scale first
        return self.proj_out(modulate(img, shift, scale))  # [B, L_img, C*4]


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations finite through all 57 blocks.

    Each linear draws N(0, 1/fan_in), so a layer keeps its input's scale; the adaLN projections are scaled down by
    10 so that gates stay small and the residual stream grows slowly over the blocks, as in a trained model.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features), generator=gen)
            module.bias.normal_(0.0, 0.02, generator=gen)
        elif isinstance(module, QKNorm):
            module.weight.fill_(1.0)
    for module in model.modules():
        if isinstance(module, AdaNorm):
            module.linear.weight.mul_(0.1)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")


def resolve_model_dir(model: str, components: tuple[str, ...] = COMPONENTS) -> str:
    """A local diffusers-layout directory as is, or a hub id downloaded (or found in the cache) by huggingface_hub."""
    if os.path.isdir(model):
        path = model
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise UserError(f"--model {model!r} is not a directory with a diffusers FLUX pipeline")
    else:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(model, allow_patterns=["model_index.json", "transformer/config.json",
                                                            *(f"{c}/*" for c in components)])
        except Exception as e:  # network, auth (FLUX.1-dev is gated) or missing repo
            raise UserError(f"could not get {model!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "for FLUX.1-dev accept its license on the hub and log in, or pass a local directory") from e
    missing = [c for c in ("model_index.json", *components) if not os.path.exists(os.path.join(path, c))]
    if missing:
        raise UserError(f"{path} is missing pipeline components: {', '.join(missing)}")
    return path


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


def read_safetensors(path: str, device) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, read straight to `device`; a file that cannot be read is named."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError) as e:  # unreadable, empty, cut short or not safetensors at all
        raise UserError(f"cannot read {path} ({e}); if it is a download, fetch it again") from e


def transformer_state_dict(directory: str, device) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, read straight to `device`."""
    index = os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = [f for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]
    if not files:
        raise UserError(f"no .safetensors weights in {directory}")
    state = {}
    for name in files:
        state.update(read_safetensors(os.path.join(directory, name), device))
    return state


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], dtype,
                        source: str = "transformer checkpoint") -> None:
    """Strict load onto a meta-device model: any missing, unexpected or mis-shaped key is named in the error."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]

    def some(keys):
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    problems = [f"{label}: {some(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)) if keys]
    if problems:
        raise UserError(f"{source} does not match its config: " + "; ".join(problems))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)


def prepare_state(state: dict[str, torch.Tensor], cfg: FluxConfig, opts: Options) -> dict[str, torch.Tensor]:
    """The load-time weight transforms, on diffusers' key names, in place and in this order: RoPE's row permutation
    (on the separate q/k weights), then the fusion of q/k/v (and the single blocks' MLP input). fp8 quantization, if
    asked for, comes after the strict load (optimize), so it quantizes the permuted, fused matrices."""
    if opts.rope_halves:
        state = permute_rope_pairs(state, cfg.attention_head_dim)
    if opts.fused_qkv:
        state = fuse_projections(state)
    return state


ROPE_PERMUTED = ("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")


def permute_rope_pairs(state: dict[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    """Options.rope_halves: reorder each head's q/k channels to (0, 2, 4, ..., 1, 3, 5, ...), in place.

    Channel 2j moves to j and 2j+1 to j + D/2, so RoPE's pairs become the two halves of the head (apply_rope).
    The q and k projections' output rows and biases and the q/k RMSNorm weights move together; q.k per head is a
    sum over channels, unchanged by reordering them in both. v and everything after attention keep their order.
    """
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    for key in [k for k in state if k.rpartition(".")[0].endswith(ROPE_PERMUTED)]:
        tensor = state[key]
        heads = tensor.unflatten(0, (-1, head_dim))  # [H, D, ...] (an RMSNorm weight: [1, D])
        state[key] = heads[:, order.to(tensor.device)].flatten(0, 1)
    return state


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' separate q/k/v (and single-block MLP input) weights -> one matrix per matmul, in place.

    Rows are stacked in output order, so the fused matmul's output splits back into exactly the separate ones.
    """
    prefixes = {m.group(1) for k in state if (m := re.match(r"((?:single_)?transformer_blocks\.\d+)", k))}
    for prefix in sorted(prefixes):
        single = prefix.startswith("single")
        for parts, fused in ([(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "to_qkv_mlp")] if single else
                             [(["attn.to_q", "attn.to_k", "attn.to_v"], "attn.to_qkv"),
                              (["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "attn.to_added_qkv")]):
            for kind in ("weight", "bias"):
                keys = [f"{prefix}.{p}.{kind}" for p in parts]
                if all(k in state for k in keys):
                    state[f"{prefix}.{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys])
    return state


def load_transformer(directory: str, cfg: FluxConfig, opts: Options, device, dtype) -> Flux:
    with torch.device("meta"):
        model = Flux(cfg, opts)
    state = prepare_state(transformer_state_dict(directory, device), cfg, opts)
    load_weights_strict(model, state, dtype, directory)
    return model.eval()


class ByteTokenizer:
    """Stand-in tokenizer for --random-weights when the real tokenizer files are not on disk.

    With random weights the token ids carry no meaning, only their count matters for speed: the prompt's UTF-8
    bytes are mapped into the vocabulary and padded to the same length the real tokenizer pads to.
    """

    def __init__(self, vocab_size: int, bos: int | None, eos: int, pad: int, model_max_length: int):
        self.vocab_size, self.bos, self.eos, self.pad = vocab_size, bos, eos, pad
        self.model_max_length = model_max_length

    def __call__(self, texts, padding=None, max_length=None, truncation=False, return_tensors=None, verbose=True):
        rows = []
        for text in texts:
            ids = ([] if self.bos is None else [self.bos]) + [3 + b for b in text.encode()] + [self.eos]
            if truncation:
                ids = ids[: max_length - 1] + [self.eos] if len(ids) > max_length else ids
            if padding == "max_length":
                ids = ids + [self.pad] * (max_length - len(ids))
            rows.append(ids)
        if padding == "longest":
            longest = max(map(len, rows))
            rows = [r + [self.pad] * (longest - len(r)) for r in rows]
        ids = torch.tensor(rows) if return_tensors == "pt" else rows
        return argparse.Namespace(input_ids=ids)


class DeferredVAE:
    """--deferred-vae: the VAE's config (all that comes before decoding needs) and its build, left to the first image.

    Importing diffusers is seconds of Python (run 34) that the first image's denoise can hide: its 28 graph replays
    keep the main thread waiting for the GPU, in the queue of launches itself (run 42), so the import runs in a thread
    started once the step is captured (a capture forbids other CUDA work) and the build follows the denoise."""

    def __init__(self, config: dict, build):
        self.config, self._build, self.thread = config, build, None

    def start_import(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._import, daemon=True)
            self.thread.start()

    @staticmethod
    def _import() -> None:
        with contextlib.suppress(ImportError):  # build()'s own import raises it again, with its message
            importlib.import_module("diffusers.models.autoencoders.autoencoder_kl")

    def build(self) -> nn.Module:
        if self.thread is not None:
            self.thread.join()
        return self._build()


@dataclass
class Pipeline:
    cfg: FluxConfig
    transformer: nn.Module
    clip: nn.Module
    t5: nn.Module
    clip_tokenizer: object
    t5_tokenizer: object
    vae: nn.Module | DeferredVAE
    model_name: str
    device: torch.device
    dtype: torch.dtype
    opts: Options
    steps: OrderedDict = field(default_factory=OrderedDict)  # (latent, text shape) -> step, least recent first
    max_steps: int = 8  # --max-graphs
    seen: dict = field(default_factory=dict)  # what the last request's code paths did, for describe()
    bf16_transformer: nn.Module | None = None  # --compare-bf16: the model the fp8 one was quantized from
    group: object = None  # under torchrun: the ranks sharing each image (context_parallel.py)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def is_main_rank(self) -> bool:
        """Rank 0 (or the only process) decodes, prints and writes; the other ranks only help denoise."""
        return self.group is None or self.group.rank() == 0


def load_tokenizers(path: str | None, model: str):
    from transformers import CLIPTokenizer, T5TokenizerFast

    if path is None:  # --random-weights: use the real tokenizers if they are already on disk
        try:
            from huggingface_hub import snapshot_download

            return load_tokenizers(model if os.path.isdir(model) else snapshot_download(
                model, allow_patterns=["tokenizer/*", "tokenizer_2/*"], local_files_only=True), model)
        except Exception:
            print("note: tokenizer files not found locally; --random-weights uses byte-level token ids")
            return (ByteTokenizer(CLIP_L_CONFIG["vocab_size"], 49406, 49407, 49407, 77),
                    ByteTokenizer(T5_XXL_CONFIG["vocab_size"], None, 1, 0, 512))
    return from_folder(CLIPTokenizer, path, "tokenizer"), from_folder(T5TokenizerFast, path, "tokenizer_2")


def from_folder(cls, path: str, folder: str, **kwargs):
    """A tokenizer, text encoder or VAE from its folder of a diffusers-layout pipeline; a damaged one is named."""
    try:
        return cls.from_pretrained(path, subfolder=folder, **kwargs)
    except Exception as e:  # a damaged file raises anything from OSError to KeyError
        reason = (str(e).splitlines() or [""])[0]
        raise UserError(f"cannot load {os.path.join(path, folder)} ({type(e).__name__}: {reason})") from e


@contextlib.contextmanager
def default_dtype(dtype):
    """Build full-size random models directly in the target dtype: a float32 detour would not fit next to them."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_pipeline(model: str, device, dtype, opts: Options, random_weights: bool = False,
                  text_encoders_from: str | None = None, offload_text_encoders: bool = False,
                  precompiled: str | None = None) -> Pipeline:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if random_weights:
        cfg = CONFIGS["flux-schnell" if "schnell" in model.lower() else "flux-dev"]
        clip_tok, t5_tok = load_tokenizers(None, model)
        with default_dtype(dtype):
            with torch.device("meta"):
                transformer = Flux(cfg, opts)
            transformer = init_random_(transformer.to_empty(device=device))
            with torch.device(device):
                torch.manual_seed(0)
                clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
                t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
        vae_config = FLUX_VAE_CONFIG
        name = f"{model} (random weights)"
    elif model.endswith(".safetensors"):  # Black Forest Labs' single file: the rest from --text-encoders-from
        from bfl_checkpoint import load_bfl_pipeline_parts

        transformer, cfg, path = load_bfl_pipeline_parts(model, text_encoders_from, opts, device, dtype)
        clip_tok, t5_tok = load_tokenizers(path, text_encoders_from)
        name = f"{model} + {text_encoders_from}"
    else:
        path = resolve_model_dir(model)
        cfg = config_from_checkpoint(read_json(os.path.join(path, "transformer", "config.json")),
                                     read_json(os.path.join(path, "scheduler", "scheduler_config.json")))
        transformer = load_transformer(os.path.join(path, "transformer"), cfg, opts, device, dtype)
        clip_tok, t5_tok = load_tokenizers(path, model)
        name = model
    if not random_weights:
        clip = from_folder(CLIPTextModel, path, "text_encoder", dtype=dtype).to(device)
        t5 = from_folder(T5EncoderModel, path, "text_encoder_2", dtype=dtype).to(device)
        vae_config = read_json(os.path.join(path, "vae", "config.json"))
    for m in (clip, t5):
        m.eval().requires_grad_(False)
    transformer.requires_grad_(False)
    if offload_text_encoders:
        from prompts_file import offload_layerwise

        offload_layerwise(clip, device), offload_layerwise(t5, device)
    bf16_transformer = optimize(transformer, opts, precompiled)

    def build_vae() -> nn.Module:
        from diffusers import AutoencoderKL

        if not random_weights:
            vae = from_folder(AutoencoderKL, path, "vae", dtype=dtype).to(device)
        else:  # its own seed, so that when it is built does not change its weights
            with torch.random.fork_rng([device] if torch.device(device).type == "cuda" else []):
                torch.manual_seed(1)
                with default_dtype(dtype), torch.device(device):
                    vae = AutoencoderKL(**FLUX_VAE_CONFIG)
        return optimize_vae(vae.eval().requires_grad_(False), opts)

    vae = DeferredVAE(vae_config, build_vae) if opts.deferred_vae else build_vae()
    return Pipeline(cfg, transformer, clip, t5, clip_tok, t5_tok, vae, name, torch.device(device), dtype, opts,
                    bf16_transformer=bf16_transformer)


def optimize(transformer: Flux, opts: Options, precompiled: str | None = None) -> Flux | None:
    """What is applied to the loaded transformer, in order (weight transforms: prepare_state; the rest of Options:
    the code paths it names; `precompiled`: compile_blocks'; the VAE's: optimize_vae, once it is built). Returns the
    bf16 model for --compare-bf16, else None."""
    bf16 = None
    if opts.lora or opts.lora_swaps:  # LoRA deltas into the weights, before fp8 quantizes them (lora.py)
        from lora import LoraWeights

        transformer.loras = LoraWeights(transformer, {f for f, _ in opts.lora} | set(opts.lora_swaps) if
                                        opts.lora_swaps else set())
        transformer.loras.apply(opts.lora)
    if opts.quantize == "fp8":  # opt-in, lossy: the blocks' matmuls at twice bf16's rate (fp8.py)
        import fp8

        bf16 = fp8.bf16_twin(transformer) if opts.compare_bf16 else None
        fp8.quantize_fp8_(transformer, opts.fp8_keep_bf16, opts.fp8_fused_quant)
    if opts.compile:  # fuses the elementwise work around the matmuls into few kernels
        if opts.dynamic_shapes:
            dynamic_shapes_config()
        if opts.regional_compile:  # else the whole step is compiled, in step_function
            compile_blocks(transformer, compile_options(opts), opts.dynamic_shapes, precompiled)
    return bf16


def optimize_vae(vae: nn.Module, opts: Options) -> nn.Module:
    """What is applied to the VAE once it is built: at load, or with the first image (--deferred-vae)."""
    if opts.channels_last_vae:  # the decoder's convolutions run faster in NHWC
        vae.to(memory_format=torch.channels_last)
    if opts.compile and opts.compile_vae:
        torch._inductor.config.conv_1x1_as_mm = True  # the VAE's 1x1 convolutions as matmuls
        quiet_compile_warnings()
        vae.decode = torch.compile(vae.decode, fullgraph=True, dynamic=opts.dynamic_shapes)
    return vae


def dynamic_shapes_config() -> None:
    """Dynamo settings for symbolic sizes: no duck sizing, as sizes that happen to be equal (a 128-token text and
    head_dim, say) would share one symbol and the next size would recompile; and Python floats (norm eps, scales) as
    constants, as symbolic ones made dynamo trace the double block twice (a restart from its scalar-to-tensor pass),
    seconds of every process's warm-up."""
    torch.fx.experimental._config.use_duck_shape = False
    torch._dynamo.config.specialize_float = True


def quiet_compile_warnings() -> None:
    """diffusers' upsampler calls an lru_cache-wrapped version check that dynamo traces through, with a multi-line
    warning per compile that the user cannot act on; only that warning is silenced."""
    warnings.filterwarnings("ignore", category=UserWarning, message=re.escape(
        "Dynamo detected a call to a `functools.lru_cache`-wrapped function at 'upsampling.py"))


def compile_options(opts: Options) -> dict:
    """Inductor options for the transformer's graphs (not the VAE's): none unless asked for.

    --inductor-tuning (opt-in: minutes more compile for 1-2%, runs 12 and 19): coordinate descent tunes inductor's
    own kernels; max_autotune_gemm times Triton matmul templates against cuBLAS at every GEMM shape. Not for the VAE:
    its convolutions alone autotuned for over 3 minutes (run 11), for 1% of the image's time.
    """
    if not opts.inductor_tuning:
        return {}
    options = {"coordinate_descent_tuning": True, "max_autotune_gemm": True}
    if torch.cuda.get_device_capability()[0] >= 9:
        options["triton.enable_persistent_tma_matmul"] = True
    return options


def compile_blocks(model: Flux, options: dict | None = None, dynamic: bool = False,
                   precompiled: str | None = None) -> None:
    """Regional compilation: dynamo reuses a compiled graph for every module of the same structure and shapes (the
    weights are graph inputs), so the 19 double blocks share one graph and the 38 single blocks another. The few ops
    between blocks run eagerly inside the CUDA graph; what is lost is fusion across block boundaries.

    dynamic: token counts and batch are symbols in the graphs, so any size reuses them (batch 1 gets graphs of its
    own: dynamo specializes sizes 0 and 1). Else each new shape compiles new graphs.
    precompiled: a directory where the graphs are saved whole and loaded by the next process, which then traces
    nothing (precompile.py; --compile-cache DIR puts them in DIR/precompiled)."""
    model.compile_options = options or {}  # what the blocks were compiled with, for describe()
    if precompiled is not None:
        from precompile import precompile_blocks

        model.precompiled = precompile_blocks(model, precompiled, model.compile_options, dynamic)
        return
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile(fullgraph=True, dynamic=dynamic, options=options)


def effective_options(opts: Options, device: torch.device) -> Options:
    """Switch off what needs CUDA, with a notice, and name the attention kernel that `auto` resolves to."""
    if device.type != "cuda" and (opts.compile or opts.cuda_graphs):
        print("note: no CUDA device: torch.compile and CUDA graphs are off")
        opts = dataclasses.replace(opts, compile=False, cuda_graphs=False)
    if opts.inductor_tuning and not opts.compile:
        raise UserError("--inductor-tuning needs torch.compile (CUDA, and no --no-compile)")
    if opts.quantize == "fp8":
        from fp8 import check_fp8_support

        check_fp8_support(device)
    return dataclasses.replace(opts, attention=resolve_attention(opts.attention, device))


def describe(pipe: Pipeline) -> str:
    """Evidence that each optimization applied, read off the model and what the last request ran (pipe.seen)."""
    model, seen, modules = pipe.transformer, pipe.seen, list(pipe.transformer.modules())
    vae = pipe.vae if isinstance(pipe.vae, nn.Module) else None  # None: deferred, and no image decoded yet
    count = lambda test: sum(1 for m in modules if test(m))  # noqa: E731
    fp8 = sys.modules.get("fp8")  # never imported: no fp8 layer can exist

    def kernel(attend) -> str:
        """The function an attention module calls, with its kernel: "cudnn", "cudnn (context_parallel_attention)", or
        for cudnn-fp8 the shapes its cuDNN graphs were built for (the kernel ran)."""
        backend = attend.keywords["backend"]
        if backend == "cudnn-fp8":
            backend += f" ({sys.modules['attention_fp8'].describe()})"
        return backend + ("" if attend.func is attention else f" ({attend.func.__name__})")

    attends = {kernel(m.attend) for m in modules if isinstance(m, (DoubleAttention, SingleAttention))}
    blocks = count(lambda m: getattr(m, "_compiled_call_impl", None) is not None)
    compiled = f"{blocks} blocks" if blocks else "whole step" if seen.get("whole_step_compiled") else "off"
    if blocks and model.compile_options:
        compiled += f" ({', '.join(f'{k}={v}' for k, v in model.compile_options.items())})"
    # Graphs dynamo holds for the block kinds (or the whole step), against the step shapes this process ran; with
    # saved graphs (precompile.py), those loaded from the compile cache and those compiled and saved here instead.
    graphs = sum(len(torch._dynamo.eval_frame._debug_get_cache_entry_list(f)) for f in (
        DoubleStreamBlock.forward, SingleStreamBlock.forward, euler_step, velocity))
    precompiled = getattr(model, "precompiled", ())
    graphs += sum(len(kind.graphs) for kind in precompiled)
    inductor = torch._dynamo.utils.counters["inductor"]
    rope_dtype = seen.get("rope_dtype")
    if "per_step_inputs" in seen:  # --no-precompute: the tables are made inside the step; make them once more here
        with torch.no_grad():
            rope_dtype = str(model.condition(**seen["per_step_inputs"])["cos"].dtype).removeprefix("torch.")
    return "optimizations: " + ", ".join(f"{k}={v}" for k, v in {
        "T5 tokens": seen.get("t5_tokens"), "conditioning": seen.get("conditioning"),
        "fused projections": sum(isinstance(getattr(m, n, None), nn.Module) for m in modules
                                 for n in ("to_qkv", "to_added_qkv", "to_qkv_mlp")),
        "rope": rope_dtype, "rope over head halves": count(lambda m: getattr(m, "halves", False)),
        "rope per stream": count(lambda m: getattr(m, "per_stream", False)), "attention": " + ".join(sorted(attends)),
        "sigmoid gelu": count(lambda m: getattr(m, "act", None) is gelu_tanh), "step": seen.get("step"),
        "compile": compiled, "compiled graphs": f"{graphs} for {len(seen.get('shapes', ()))} step shapes",
        "precompiled graphs loaded/compiled": "/".join(str(sum(getattr(kind, n) for kind in precompiled))
                                                 for n in ("loaded", "compiled")) if precompiled else "off",
        "compile cache hits/misses": f"{inductor['fxgraph_cache_hit']}/{inductor['fxgraph_cache_miss']}",
        "vae built": seen.get("vae_built", "not yet" if vae is None else "at load"),
        "vae compiled": vae is not None and hasattr(vae.decode, "_torchdynamo_orig_callable"),
        "cuda graphs": sum(isinstance(s, CUDAGraphStep) for s in pipe.steps.values()),
        "channels-last vae": vae is not None and next(vae.parameters()).is_contiguous(
            memory_format=torch.channels_last),
        "uint8 on": seen.get("uint8_on"), "lora layers": len(model.loras.touched) if hasattr(model, "loras") else 0,
        "fp8 linear layers": 0 if fp8 is None else count(lambda m: isinstance(m, fp8.Float8Linear)),
        "fp8 fused quant": 0 if fp8 is None else fp8.fused_quant_functions(model)}.items())


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline: encode, denoise, decode
# ----------------------------------------------------------------------------------------------------------------------
def tokenize(tokenizer, prompts: list[str], max_length: int, name: str, bucket: int = 0) -> torch.Tensor:
    # verbose=False: transformers' own too-long warning, on the untruncated count, says less than ours.
    full = tokenizer(prompts, padding="longest", return_tensors="pt", verbose=False).input_ids
    dropped = full.shape[1] - max_length
    if dropped > 0:
        warn(f"prompt longer than {name}'s {max_length} tokens; {dropped} tokens were dropped")
    if bucket:  # pad to the next multiple of `bucket`: a short prompt costs less, with few shapes to compile
        max_length = min(max_length, -(-full.shape[1] // bucket) * bucket)
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompt(pipe: Pipeline, prompts: list[str], prompts_2: list[str], max_sequence_length: int):
    """CLIP's pooled vector [B, 768] conditions every block; T5's tokens [B, L, 4096] are attended to."""
    clip_ids = tokenize(pipe.clip_tokenizer, prompts, 77, "CLIP")
    t5_ids = tokenize(pipe.t5_tokenizer, prompts_2, max_sequence_length, "T5", TEXT_BUCKET * pipe.opts.text_buckets)
    pipe.seen["t5_tokens"] = t5_ids.shape[1]
    pooled = pipe.clip(clip_ids.to(pipe.device), output_hidden_states=False).pooler_output.to(pipe.dtype)
    txt = pipe.t5(t5_ids.to(pipe.device), output_hidden_states=False)[0].to(pipe.dtype)
    return txt, pooled


TEXT_BUCKET = 128


@functools.cache  # each warning once per run (main clears it), however many warm-up and timed runs repeat it
def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def initial_noise(seeds: list[int], channels: int, h: int, w: int, dtype) -> torch.Tensor:
    """One CPU generator per image, as diffusers' FluxPipeline with generator=[torch.Generator("cpu").manual_seed(s)
    for s in seeds]: each image of a batch is the image its seed gives alone."""
    return torch.cat([torch.randn((1, channels, h, w), generator=torch.Generator("cpu").manual_seed(s), dtype=dtype)
                      for s in seeds])


def velocity(model: Flux, x: torch.Tensor, cond: dict) -> torch.Tensor:
    if "mods" not in cond:  # --no-precompute: redo every step what only depends on the request
        cond = model.condition(**cond)
    return model(x, **cond)


def euler_step(model: Flux, x: torch.Tensor, dt: torch.Tensor, cond: dict) -> torch.Tensor:
    """One step of the sampler as one function, so the compiler fuses the update into the last projection."""
    # As in diffusers' scheduler: state in float32 for the update, (dt * v) in the model dtype.
    return (x.float() + dt * velocity(model, x, cond)).to(x.dtype)


class CUDAGraphStep:
    """A step function captured once as a CUDA graph and replayed: one launch instead of ~1500 per step. Replays
    read fixed input buffers and write a fixed output buffer: each call copies its inputs in, and the output is
    overwritten by the next call."""

    def __init__(self, fn, *args):
        flat, self.spec = tree_flatten(args)
        self.static = [a.clone() if isinstance(a, torch.Tensor) else a for a in flat]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: compiles, autotunes, allocates workspaces
            for _ in range(2):
                fn(*tree_unflatten(self.static, self.spec))
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*tree_unflatten(self.static, self.spec))

    def __call__(self, *args):
        flat, spec = tree_flatten(args)
        if spec != self.spec:
            raise ValueError(f"inputs do not match the captured graph's: {spec} vs {self.spec}")
        for dst, src in zip(self.static, flat, strict=True):
            if isinstance(src, torch.Tensor) and src is not dst:
                dst.copy_(src)
        self.graph.replay()
        return self.out


def step_function(pipe: Pipeline, x: torch.Tensor, dt: torch.Tensor, cond: dict):
    """The compiled and graphed step for this input shape: built on first use, then reused across requests."""
    opts = pipe.opts
    key = (tuple(x.shape), tuple(cond["txt"].shape))
    pipe.seen.setdefault("shapes", set()).add(key)
    if key in pipe.steps:
        pipe.steps.move_to_end(key)
    else:
        if len(pipe.steps) >= pipe.max_steps:  # evict the least recently used shape and give its memory back
            pipe.steps.popitem(last=False)
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()
        fn = functools.partial(euler_step if opts.euler_in_graph else velocity, pipe.transformer)
        pipe.seen["step"] = fn.func.__name__
        if opts.compile and not opts.regional_compile:  # else its blocks are compiled already (compile_blocks)
            fn = torch.compile(fn, fullgraph=True, dynamic=opts.dynamic_shapes, options=compile_options(opts))
            pipe.seen["whole_step_compiled"] = True
        args = (x, dt, cond) if opts.euler_in_graph else (x, cond)
        counters = torch._dynamo.utils.counters
        t0, graphs, cached = time.perf_counter(), counters["stats"]["unique_graphs"], counters["inductor"][
            "fxgraph_cache_hit"]
        pipe.steps[key] = CUDAGraphStep(fn, *args) if opts.cuda_graphs else fn
        if opts.cuda_graphs:  # warm-up and capture ran just now (without graphs, compilation waits for step 1)
            sync(pipe.device)
            graphs = counters["stats"]["unique_graphs"] - graphs
            cached = counters["inductor"]["fxgraph_cache_hit"] - cached
            print(f"step for latents {tuple(x.shape)}, text {tuple(cond['txt'].shape)}: "
                  f"{f'{graphs} graphs traced ({cached} from the compile cache), ' if graphs else ''}"
                  f"captured as a CUDA graph in {time.perf_counter() - t0:.1f}s")
    return pipe.steps[key]


@torch.no_grad()
def denoise(pipe: Pipeline, noise: torch.Tensor, txt, pooled, sigmas: torch.Tensor, guidance: float | None):
    """Euler integration of the flow ODE dx/dsigma = v(x, sigma) from sigma=1 (noise) to sigma=0 (image)."""
    model, opts = pipe.transformer, pipe.opts
    b, _, h, w = noise.shape
    x = pack(noise)  # [B, L_img, C*4]
    img_ids = image_ids(h, w, x.device)
    txt_ids = torch.zeros(txt.shape[1], 3, device=x.device)
    if pipe.group is not None:  # context parallel: from here on this rank holds only its share of the tokens
        from context_parallel import shard_tokens

        x, txt, txt_ids, img_ids = shard_tokens(x, txt, txt_ids, img_ids, pipe.group)
    sigmas = sigmas.to(x.device)
    steps = len(sigmas) - 1
    # diffusers hands the model (1000 sigma) in the latent dtype, divided by 1000; the same rounding here
    # keeps bf16 images identical to FluxPipeline's.
    timesteps = (sigmas[:-1] * 1000).to(x.dtype) / 1000  # [steps]
    dts = sigmas[1:] - sigmas[:-1]
    if opts.precompute:  # all steps at once: [steps * B] rows, step-major
        guidance_all = None if guidance is None else torch.full((steps * b,), guidance, device=x.device)
        cond = model.condition(txt, txt_ids, img_ids, timesteps.repeat_interleave(b), guidance_all,
                               pooled.repeat(steps, 1))
        mods = cond["mods"].view(steps, b, -1)
        conds = [{**cond, "mods": mods[i]} for i in range(steps)]
        pipe.seen.update(conditioning="once per request", rope_dtype=str(cond["cos"].dtype).removeprefix("torch."))
    else:
        guidance_vec = None if guidance is None else torch.full((b,), guidance, device=x.device)
        conds = [dict(txt=txt, txt_ids=txt_ids, img_ids=img_ids, timestep=timesteps[i].expand(b),
                      guidance=guidance_vec, pooled=pooled) for i in range(steps)]
        pipe.seen.update(conditioning="every step", per_step_inputs=conds[0])
    step = step_function(pipe, x, dts[0], conds[0])
    if isinstance(pipe.vae, DeferredVAE) and pipe.is_main_rank:  # captured: diffusers' import can run beside it
        pipe.vae.start_import()
    for i in tqdm(range(steps), desc="denoising", leave=False, disable=None if pipe.is_main_rank else True):
        if opts.euler_in_graph:
            x = step(x, dts[i], conds[i])
        else:
            x = (x.float() + dts[i] * step(x, conds[i])).to(x.dtype)
    if pipe.group is not None:
        from context_parallel import gather_tokens

        x = gather_tokens(x, pipe.group)
    return unpack(x, h, w)


@torch.no_grad()
def decode(pipe: Pipeline, latents: torch.Tensor) -> np.ndarray:
    """Undo the latent normalization, decode, and map [-1, 1] to uint8 pixels [B, H, W, 3]."""
    vae, opts = pipe.vae, pipe.opts
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    layout = torch.channels_last if opts.channels_last_vae else torch.contiguous_format
    image = vae.decode(latents.to(vae.dtype, memory_format=layout), return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().to(None if opts.uint8_on_gpu else "cpu")
    pipe.seen["uint8_on"] = image.device.type
    return (image * 255).round().to(torch.uint8).cpu().numpy()


@dataclass
class Request:
    prompts: list[str]
    prompts_2: list[str]
    height: int
    width: int
    steps: int
    guidance: float
    seeds: list[int]  # one per prompt
    max_sequence_length: int


def generate(pipe: Pipeline, req: Request, timer: Timer) -> np.ndarray | None:
    """The images [B, H, W, 3] as uint8; None on the ranks other than 0 of a context-parallel run."""
    with timer("text_encoders"):
        txt, pooled = encode_prompt(pipe, req.prompts, req.prompts_2, req.max_sequence_length)
    h, w = latent_grid(req.height, req.width, pipe.vae_scale_factor)
    sigmas = flow_match_sigmas(req.steps, (h // 2) * (w // 2), pipe.cfg.scheduler)
    guidance = req.guidance if pipe.cfg.guidance_embeds else None
    noise = initial_noise(req.seeds, pipe.cfg.in_channels // 4, h, w, pipe.dtype).to(pipe.device)
    with timer("denoiser"):
        latents = denoise(pipe, noise, txt, pooled, sigmas, guidance)
    if isinstance(pipe.vae, DeferredVAE) and pipe.is_main_rank:  # before the check below waits for the GPU
        pipe.vae = pipe.vae.build()
        pipe.seen["vae_built"] = "with the first image"
    if not torch.isfinite(latents).all():
        raise UserError("NaN/Inf in the latents after denoising (try --dtype bfloat16 or float32)")
    if not pipe.is_main_rank:
        return None
    with timer("vae"):
        return decode(pipe, latents)


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------
class Timer:
    """Per-component wall time: CUDA events on the GPU (no sync inside the timed region), a synced clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans[name] = [start, end]
        else:
            t0 = time.perf_counter()
            yield
            self.spans[name] = [t0, time.perf_counter()]

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: s.elapsed_time(e) / 1000 for k, (s, e) in self.spans.items()}
        return {k: e - s for k, (s, e) in self.spans.items()}


def timed_runs(pipe: Pipeline, req: Request, warmup: int, runs: int):
    """Warm-up runs, then `runs` timed runs; returns the last images and per-run component times."""
    if pipe.device.type == "cuda":  # report the peak of generating (weights included), not of loading
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        generate(pipe, req, Timer(pipe.device))
    sync(pipe.device)
    warmup_s = time.perf_counter() - t0
    per_run = []
    for _ in range(runs):
        timer = Timer(pipe.device)
        t0 = time.perf_counter()
        images = generate(pipe, req, timer)
        sync(pipe.device)
        per_run.append({**timer.seconds(), "end_to_end": time.perf_counter() - t0})
    return images, per_run, warmup_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summarize(per_run: list[dict], warmup_s: float, device: torch.device) -> dict:
    summary = {"warmup_s": warmup_s, "runs": per_run}
    for key in per_run[0]:
        values = [r[key] for r in per_run]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    if device.type == "cuda":
        summary["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        summary["gpu"] = torch.cuda.get_device_name()
    summary["torch"] = torch.__version__
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless there is none worth showing or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--prompt", default=None, help="what to draw (or --prompts-file)")
    p.add_argument("--prompt-2", default=None, help="prompt for T5 (defaults to --prompt)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="hub id, local diffusers-layout directory, or a Black Forest Labs single-file "
                        "transformer (flux1-dev.safetensors; with --text-encoders-from)")
    p.add_argument("--text-encoders-from", default=None,
                   help="with a single-file --model: hub id or diffusers directory for text encoders, VAE, scheduler")
    p.add_argument("--random-weights", action="store_true",
                   help="full-size model with random weights, no download (for timing only)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 28 for dev, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: 3.5 for dev, unused by schnell)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1,
                   help="images of the prompt per forward pass, with seeds --seed, --seed + 1, ...")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: 512 dev, 256 schnell)")
    p.add_argument("--output", default="output.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (compile, capture)")
    p.add_argument("--runs", type=int, default=1, help="timed runs; medians are printed")
    p.add_argument("--timings-json", default=None, help="write per-run timings and medians here")
    p.add_argument("--profile", default=None, metavar="JSON", help="profile one extra run; kernel breakdown here")
    m = p.add_argument_group("many prompts, many shapes (prompts_file.py)")
    m.add_argument("--prompts-file", default=None, help="a prompt per line, or JSON lines (see prompts_file.py)")
    m.add_argument("--output-dir", default="outputs", help="with --prompts-file: images as <index>-<seed>.png")
    m.add_argument("--strict", action="store_true", help="a bad line in --prompts-file stops the run before any image")
    m.add_argument("--overwrite", action="store_true", help="make again the images already in --output-dir")
    m.add_argument("--max-graphs", type=int, default=8, help="captured shapes kept, least recently used evicted")
    m.add_argument("--compile-cache", default=None, help="compile cache directory: inductor's cache, the saved "
                   "graphs, and Python's bytecode where PYTHONDONTWRITEBYTECODE is set (default: torch's, in /tmp)")
    m.add_argument("--offload-text-encoders", action="store_true",
                   help="CLIP/T5 in CPU memory, streamed to the GPU layer by layer: less GPU memory, slower")
    o = p.add_argument_group("optimizations (each on by default; --no-... turns one off)")
    for f in OPTIMIZATIONS:  # one definition each, in Options
        text = f"{f.metadata['what']}. Why: {f.metadata['why']}".replace("%", "%%")
        if f.name == "attention":
            o.add_argument("--attention", default=f.default, choices=ATTENTION_BACKENDS, help=text)
        else:
            o.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                           help=f"turn off: {text}")
    o.add_argument("--inductor-tuning", action="store_true",
                   help="opt-in: coordinate-descent and GEMM autotuning in inductor (minutes more compile)")
    o.add_argument("--compile-vae", action="store_true",
                   help="opt-in: torch.compile of the VAE decoder: ~0.05 s less per image, ~50 s more "
                        "compile on the first run (11 s from the cache)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="a LoRA fused into the weights (a .safetensors file or owner/repo:weight_name; repeatable)")
    p.add_argument("--lora-scale", action="append", type=float, default=[], help="one per --lora (default: 1.0)")
    q = p.add_argument_group("fp8 (fp8.py; opt-in: faster, and the image changes a little)")
    q.add_argument("--quantize", default="none", choices=["none", "fp8"],
                   help="fp8: the blocks' linear layers in float8 e4m3 (per-channel weight, per-token input scales)")
    q.add_argument("--fp8-keep-bf16", type=int, default=0, metavar="N",
                   help="with --quantize fp8: the first N and the last N of the 57 blocks stay bf16")
    q.add_argument("--compare-bf16", action="store_true",
                   help="with --quantize fp8: keep the bf16 model too (+8.6 GB); report fp8's error against it")
    return p


def check_args(args, defaults: argparse.Namespace) -> None:
    """Everything that can be checked before loading gigabytes of weights."""
    from_file = ("output_dir", "strict", "overwrite") if args.prompts_file is None else ()  # --prompts-file's own
    if unread := [f"--{n.replace('_', '-')}" for n in from_file if getattr(args, n) != getattr(defaults, n)]:
        raise UserError(f"{', '.join(unread)} need --prompts-file")
    if args.prompts_file:
        from prompts_file import check_prompts_file_args

        check_prompts_file_args(args, defaults)
    if args.prompts_file is None and not (args.prompt or "").strip():
        raise UserError("--prompt is empty (give --prompt or --prompts-file)")
    if args.max_graphs < 1:
        raise UserError(f"--max-graphs must be >= 1, got {args.max_graphs}")
    check_common_args(args)
    if os.path.splitext(args.output)[1].lower() != ".png":  # the settings go into the PNG's text chunks
        raise UserError(f"--output {args.output}: images are written as PNG, give a name ending in .png")
    if (args.quantize, args.fp8_keep_bf16, args.compare_bf16) != ("none", 0, False):
        from fp8 import check_fp8_args

        check_fp8_args(args)
    check_writable(None if args.prompts_file else args.output, args.timings_json, args.profile)


MAX_SIDE = 2048  # per side: the largest size measured (README: 2048x2048); far beyond, the schedule overflows
MEMORY_SAVERS = "--offload-text-encoders, --quantize fp8, or a smaller --height/--width or --batch-size"


def check_common_args(args) -> None:
    """The flags both scripts and benchmark.py take, checked before anything is loaded."""
    if args.steps is not None and args.steps <= 0:
        raise UserError(f"--steps must be positive, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not (0 < args.height <= MAX_SIDE and 0 < args.width <= MAX_SIDE):
        raise UserError(f"--height/--width must be positive and at most {MAX_SIDE}, got {args.height}x{args.width}")
    if args.max_sequence_length is not None and not 0 < args.max_sequence_length <= 512:  # T5's, as in diffusers
        raise UserError(f"--max-sequence-length must be 1 to 512 (T5's limit), got {args.max_sequence_length}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed <= 2**64 - args.batch_size:  # torch's seeds are 64-bit; image i uses --seed + i
        raise UserError(f"--seed must be 0 to 2**64 - 1 (with --seed + i for image i of a batch), got {args.seed}")
    if args.warmup < 0 or args.runs < 1:
        raise UserError("--warmup must be >= 0 and --runs >= 1")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UserError(f"--device {args.device!r}: this script runs on cpu, cuda or cuda:N")
    if args.device != "cpu" and int(args.device[5:] or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}, but {torch.cuda.device_count()} CUDA device(s) are available")
    if args.random_weights and args.device == "cpu":
        raise UserError("--random-weights builds the full 12B model, for a GPU (about 33 GB in bf16); on the CPU "
                        "use a tiny pipeline: python tiny_pipeline.py /tmp/tiny-flux, then --model /tmp/tiny-flux")


def check_writable(*paths: str | None) -> None:
    """Each output path can be written: found now, not after the run (a nameless file is made in its folder)."""
    for path in filter(None, paths):
        if os.path.isdir(path):
            raise UserError(f"cannot write {path}: it is a directory")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"cannot write {path}: {folder} is not a writable directory ({e.strerror})") from e


def check_size(height: int, width: int, vae_scale_factor: int) -> None:
    multiple = vae_scale_factor * 2  # the VAE downsamples, then 2x2 latent patches become tokens
    if height % multiple or width % multiple:
        raise UserError(f"--height/--width must be multiples of {multiple} for this model, got {height}x{width}")


def save_png(image: np.ndarray, path: str, metadata: dict) -> None:
    """Write atomically, so a failure never leaves a half-written file behind."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    tmp = path + ".tmp"
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {e}") from e


def as_user_error(e: Exception, batch: int, height: int, width: int) -> UserError:
    """Bad input as it is; out of memory (torch.OutOfMemoryError; on the CPU MemoryError or "you tried to allocate N
    bytes") as what was asked for and MEMORY_SAVERS. Anything else is a bug: raised again, traceback and all."""
    if isinstance(e, UserError):
        return e
    if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "you tried to allocate" not in str(e):
        raise e
    where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
    return UserError(f"out of {where} memory for {batch} image(s) of {width}x{height}; try {MEMORY_SAVERS}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warn.cache_clear()
    try:
        check_args(args, parser.parse_args([]))
        group = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the processes share every image
            import context_parallel

            args.device, group = context_parallel.init_distributed(args.device)
        dtype = getattr(torch, args.dtype)
        loras = {}
        if args.lora or args.prompts_file:  # the --lora flags, and the LoRA files a prompts file switches to
            from lora import lora_options

            loras = lora_options(args)
        opts = effective_options(Options(**{**{f.name: getattr(args, f.name) for f in fields(Options) if "lora" not in
                                               f.name}, **loras}), torch.device(args.device))
        precompiled = None
        if opts.compile and args.compile_cache is not None:  # first: it may cache the bytecode of what follows
            from prompts_file import use_compile_cache

            precompiled = use_compile_cache(args.compile_cache)
        if opts.compile:  # --no-dynamic-shapes: a graph per shape and kind of block (double/single, bf16/fp8)
            torch._dynamo.config.recompile_limit = max(8, 4 * args.max_graphs)
        # Saved graphs are for one process's blocks: not under torchrun (each rank's attention holds its process
        # group), nor with --compare-bf16 (it runs the compiled blocks eagerly through dynamo's stance).
        if group is not None or opts.compare_bf16:
            precompiled = None
        t0 = time.perf_counter()
        pipe = load_pipeline(args.model, args.device, dtype, opts, args.random_weights, args.text_encoders_from,
                             args.offload_text_encoders, precompiled)
        pipe.max_steps = args.max_graphs
        if group is not None:
            context_parallel.enable_context_parallel(pipe, group)
        if pipe.is_main_rank:  # what a warm start cannot skip (the compile cache helps with what comes after)
            print(f"models loaded in {time.perf_counter() - t0:.1f}s")
        if args.prompts_file:
            from prompts_file import run_prompts_file

            run_prompts_file(pipe, args)
            return 0
        check_size(args.height, args.width, pipe.vae_scale_factor)
        cfg = pipe.cfg
        req = Request([args.prompt] * args.batch_size, [args.prompt_2 or args.prompt] * args.batch_size,
                      args.height, args.width,
                      args.steps or cfg.default_steps,
                      cfg.default_guidance if args.guidance is None else args.guidance,
                      [args.seed + i for i in range(args.batch_size)],
                      args.max_sequence_length or cfg.max_sequence_length)
        images, per_run, warmup_s = timed_runs(pipe, req, args.warmup, args.runs)
        if args.profile:
            from profiling import profile_run

            profile_run(pipe, req, args.profile)
        if not pipe.is_main_rank:  # context parallel: rank 0 reports the timings and writes the files
            return 0
        print(describe(pipe))
        summary = summarize(per_run, warmup_s, pipe.device)
        for key in ("text_encoders", "denoiser", "vae"):
            print(f"{key} time: {summary[key]['median']:.3f}s")
        print(f"end-to-end time: {summary['end_to_end']['median']:.3f}s")
        if pipe.bf16_transformer is not None:
            from fp8 import compare_bf16

            summary["fp8_vs_bf16"] = compare_bf16(pipe, req)
        stem, ext = os.path.splitext(args.output)
        for i, image in enumerate(images):
            path = args.output if len(images) == 1 else f"{stem}-{i}{ext}"
            save_png(image, path, {
                "prompt": args.prompt, "prompt_2": args.prompt_2 or args.prompt, "seed": req.seeds[i],
                "steps": req.steps, "guidance": req.guidance, "size": f"{req.width}x{req.height}",
                "model": pipe.model_name, "random_weights": args.random_weights, "lora": list(opts.lora),
            })
            print(f"saved {path}")
        if args.timings_json:
            with open(args.timings_json, "w") as f:
                json.dump({"script": os.path.basename(__file__), "args": vars(args), **summary}, f, indent=1)
    except (UserError, MemoryError, RuntimeError) as e:  # a RuntimeError only if out of memory (as_user_error)
        message = as_user_error(e, args.batch_size, args.height, args.width)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:  # same on every rank: once
            print(f"error: {message}", file=sys.stderr)
        else:  # torchrun stops every rank once one fails: leave rank 0 the time to say why
            time.sleep(2)
        return 2
    return 0


if __name__ == "__main__":
    # The sibling modules import this file by name: make that this module, not a second copy of it.
    sys.modules["optimized_inference"] = sys.modules["__main__"]
    sys.exit(main())
