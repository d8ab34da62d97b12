"""FLUX.1 text-to-image in one readable file: the reference implementation.

    python single_file_inference.py --prompt "a corgi astronaut on the moon"

The pipeline, top to bottom:
  1. encode the prompt twice: CLIP-L gives one pooled vector, T5-XXL gives a sequence of token embeddings;
  2. draw Gaussian noise in the VAE's latent space and pack it into 2x2 patches, one token each;
  3. integrate the flow-matching ODE from noise (sigma=1) to image (sigma=0) with Euler steps, asking the
     transformer for the velocity at each step;
  4. unpack the latents and decode them to pixels with the VAE.

The transformer and the sampler are written out here; tokenizers, text encoders and the VAE come from
transformers and diffusers. `optimized_inference.py` mirrors this file section by section, so
`diff single_file_inference.py optimized_inference.py` reads as the list of optimizations.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError, safe_open
from torch import nn
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


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for positions `ids` [S, n_axes]; each axis rotates its own slice of the head dimension.

    Angles are computed in float64 as diffusers computes them, for tables identical to its own (the positions are at
    most a few hundred: float32 would be off by about 1e-5).
    """
    cos, sin = [], []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(ids[:, i].double(), freqs)  # [S, dim/2]
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)  # [S, head_dim] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of x [B, S, H, D] by the angles behind cos/sin [S, D], in float32."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention over the joint text+image sequence: [B, S, H, D] -> [B, S, H*D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: normalize without affine weights, then scale and shift per sample from the conditioning vector."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


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

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(vec)).chunk(self.n, dim=-1)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Index 1 is diffusers' dropout slot: kept empty so the keys read ff.net.0.proj / ff.net.2.
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim)])
        self.net[0].proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class DoubleAttention(nn.Module):
    """Joint attention with separate projections for the image stream and the text ("added") stream."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = QKNorm(head_dim), QKNorm(head_dim)
        self.norm_added_q, self.norm_added_k = QKNorm(head_dim), QKNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, img, txt, pe):
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731  [B, S, H*D] -> [B, S, H, D]
        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img)))], dim=1)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img)))], dim=1)
        v = torch.cat([heads(self.add_v_proj(txt)), heads(self.to_v(img))], dim=1)
        out = attention(apply_rope(q, *pe), apply_rope(k, *pe), v)  # [B, L_txt + L_img, hidden]
        txt_out, img_out = out.split([txt.shape[1], img.shape[1]], dim=1)
        return self.to_out[0](img_out), self.to_add_out(txt_out)


class DoubleStreamBlock(nn.Module):
    """Image and text tokens keep their own weights but attend jointly (MMDiT)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = DoubleAttention(dim, cfg.attention_head_dim)
        self.ff, self.ff_context = FeedForward(dim, hidden), FeedForward(dim, hidden)

    def forward(self, img, txt, vec, pe):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(vec)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(vec)
        img_attn, txt_attn = self.attn(modulate(img, shift1, scale1), modulate(txt, c_shift1, c_scale1), pe)
        img = img + gate1[:, None] * img_attn
        img = img + gate2[:, None] * self.ff(modulate(img, shift2, scale2))
        txt = txt + c_gate1[:, None] * txt_attn
        txt = txt + c_gate2[:, None] * self.ff_context(modulate(txt, c_shift2, c_scale2))
        return img, txt


class SingleAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = QKNorm(head_dim), QKNorm(head_dim)

    def forward(self, x, pe):
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731
        q, k, v = self.norm_q(heads(self.to_q(x))), self.norm_k(heads(self.to_k(x))), heads(self.to_v(x))
        return attention(apply_rope(q, *pe), apply_rope(k, *pe), v)


class SingleStreamBlock(nn.Module):
    """One stream over the joined text+image sequence; attention and MLP run in parallel off the same input."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.norm = AdaNorm(dim, 3)
        self.attn = SingleAttention(dim, cfg.attention_head_dim)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(dim + hidden, dim)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.norm(vec)
        h = modulate(x, shift, scale)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return x + gate[:, None] * self.proj_out(torch.cat([self.attn(h, pe), mlp], dim=-1))


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaNorm(dim, 2)
        self.proj_out = nn.Linear(dim, cfg.in_channels)

    def forward(self, img, img_ids, txt, txt_ids, timestep, guidance, pooled) -> torch.Tensor:
        """Velocity for packed latents img [B, L_img, C*4] at noise level `timestep` (sigma, [B])."""
        img, txt = self.x_embedder(img), self.context_embedder(txt)  # [B, L, hidden]
        # Trained with timesteps and guidance in [0, 1000]; scaled in the model dtype, as diffusers does.
        dtype = img.dtype
        vec = self.time_text_embed(timestep.to(dtype) * 1000, None if guidance is None else guidance.to(dtype) * 1000,
                                   pooled)
        pe = rope(torch.cat([txt_ids, img_ids]), self.cfg.axes_dims_rope, self.cfg.rope_theta)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat([txt, img], dim=1)  # [B, L_txt + L_img, hidden]
        for block in self.single_transformer_blocks:
            x = block(x, vec, pe)
        img = x[:, txt.shape[1]:]
        scale, shift = self.norm_out(vec)  # diffusers' AdaLayerNormContinuous order: scale first
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


def resolve_model_dir(model: str) -> str:
    """A local diffusers-layout directory as is, or a hub id downloaded (or found in the cache) by huggingface_hub."""
    if os.path.isdir(model):
        path = model
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise UserError(f"--model {model!r} is not a directory with a diffusers FLUX pipeline")
    else:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(model, allow_patterns=["model_index.json", *(f"{c}/*" for c in COMPONENTS)])
        except Exception as e:  # network, auth (FLUX.1-dev is gated) or missing repo
            raise UserError(f"could not get {model!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "for FLUX.1-dev accept its license on the hub and log in, or pass a local directory") from e
    missing = [c for c in ("model_index.json", *COMPONENTS) if not os.path.exists(os.path.join(path, c))]
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


def load_transformer(directory: str, cfg: FluxConfig, device, dtype) -> Flux:
    with torch.device("meta"):
        model = Flux(cfg)
    load_weights_strict(model, transformer_state_dict(directory, device), dtype, directory)
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


@dataclass
class Pipeline:
    cfg: FluxConfig
    transformer: nn.Module
    clip: nn.Module
    t5: nn.Module
    clip_tokenizer: object
    t5_tokenizer: object
    vae: nn.Module
    model_name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


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


def load_pipeline(model: str, device, dtype, random_weights: bool = False) -> Pipeline:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if random_weights:
        cfg = CONFIGS["flux-schnell" if "schnell" in model.lower() else "flux-dev"]
        clip_tok, t5_tok = load_tokenizers(None, model)
        with default_dtype(dtype):
            with torch.device("meta"):
                transformer = Flux(cfg)
            transformer = init_random_(transformer.to_empty(device=device))
            with torch.device(device):
                torch.manual_seed(0)
                clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
                t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
                vae = AutoencoderKL(**FLUX_VAE_CONFIG)
        name = f"{model} (random weights)"
    else:
        path = resolve_model_dir(model)
        cfg = config_from_checkpoint(read_json(os.path.join(path, "transformer", "config.json")),
                                     read_json(os.path.join(path, "scheduler", "scheduler_config.json")))
        transformer = load_transformer(os.path.join(path, "transformer"), cfg, device, dtype)
        clip_tok, t5_tok = load_tokenizers(path, model)
        clip = from_folder(CLIPTextModel, path, "text_encoder", dtype=dtype).to(device)
        t5 = from_folder(T5EncoderModel, path, "text_encoder_2", dtype=dtype).to(device)
        vae = from_folder(AutoencoderKL, path, "vae", dtype=dtype).to(device)
        name = model
    for m in (clip, t5, vae):
        m.eval().requires_grad_(False)
    transformer.requires_grad_(False)
    return Pipeline(cfg, transformer, clip, t5, clip_tok, t5_tok, vae, name, torch.device(device), dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline: encode, denoise, decode
# ----------------------------------------------------------------------------------------------------------------------
def tokenize(tokenizer, prompts: list[str], max_length: int, name: str) -> torch.Tensor:
    # verbose=False: transformers' own too-long warning, on the untruncated count, says less than ours.
    full = tokenizer(prompts, padding="longest", return_tensors="pt", verbose=False).input_ids
    dropped = full.shape[1] - max_length
    if dropped > 0:
        warn(f"prompt longer than {name}'s {max_length} tokens; {dropped} tokens were dropped")
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompt(pipe: Pipeline, prompts: list[str], prompts_2: list[str], max_sequence_length: int):
    """CLIP's pooled vector [B, 768] conditions every block; T5's tokens [B, L, 4096] are attended to."""
    clip_ids = tokenize(pipe.clip_tokenizer, prompts, 77, "CLIP")
    t5_ids = tokenize(pipe.t5_tokenizer, prompts_2, max_sequence_length, "T5")
    pooled = pipe.clip(clip_ids.to(pipe.device), output_hidden_states=False).pooler_output.to(pipe.dtype)
    txt = pipe.t5(t5_ids.to(pipe.device), output_hidden_states=False)[0].to(pipe.dtype)
    return txt, pooled


@functools.cache  # each warning once per run (main clears it), however many warm-up and timed runs repeat it
def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def initial_noise(seeds: list[int], channels: int, h: int, w: int, dtype) -> torch.Tensor:
    """One CPU generator per image, as diffusers' FluxPipeline with generator=[torch.Generator("cpu").manual_seed(s)
    for s in seeds]: each image of a batch is the image its seed gives alone."""
    return torch.cat([torch.randn((1, channels, h, w), generator=torch.Generator("cpu").manual_seed(s), dtype=dtype)
                      for s in seeds])


@torch.no_grad()
def denoise(model: nn.Module, noise: torch.Tensor, txt, pooled, sigmas: torch.Tensor, guidance: float | None):
    """Euler integration of the flow ODE dx/dsigma = v(x, sigma) from sigma=1 (noise) to sigma=0 (image)."""
    b, _, h, w = noise.shape
    x = pack(noise)  # [B, L_img, C*4]
    img_ids = image_ids(h, w, x.device)
    txt_ids = torch.zeros(txt.shape[1], 3, device=x.device)
    guidance_vec = None if guidance is None else torch.full((b,), guidance, device=x.device)
    sigmas = sigmas.to(x.device)
    for i in tqdm(range(len(sigmas) - 1), desc="denoising", leave=False, disable=None):
        # diffusers hands the model (1000 sigma) in the latent dtype, divided by 1000; the same rounding here
        # keeps bf16 images identical to FluxPipeline's.
        timestep = (sigmas[i] * 1000).expand(b).to(x.dtype) / 1000
        v = model(x, img_ids, txt, txt_ids, timestep, guidance_vec, pooled)
        # As in diffusers' scheduler: state in float32 for the update, (dt * v) in the model dtype.
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(x.dtype)
    return unpack(x, h, w)


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor) -> np.ndarray:
    """Undo the latent normalization, decode, and map [-1, 1] to uint8 pixels [B, H, W, 3]."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (image * 255).round().astype(np.uint8)


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


def generate(pipe: Pipeline, req: Request, timer: Timer) -> np.ndarray:
    with timer("text_encoders"):
        txt, pooled = encode_prompt(pipe, req.prompts, req.prompts_2, req.max_sequence_length)
    h, w = latent_grid(req.height, req.width, pipe.vae_scale_factor)
    sigmas = flow_match_sigmas(req.steps, (h // 2) * (w // 2), pipe.cfg.scheduler)
    guidance = req.guidance if pipe.cfg.guidance_embeds else None
    noise = initial_noise(req.seeds, pipe.cfg.in_channels // 4, h, w, pipe.dtype).to(pipe.device)
    with timer("denoiser"):
        latents = denoise(pipe.transformer, noise, txt, pooled, sigmas, guidance)
    if not torch.isfinite(latents).all():
        raise UserError("NaN/Inf in the latents after denoising (try --dtype bfloat16 or float32)")
    with timer("vae"):
        return decode(pipe.vae, latents)


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
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--prompt-2", default=None, help="prompt for T5 (defaults to --prompt)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="hub id or local diffusers-layout directory")
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
    p.add_argument("--warmup", type=int, default=0, help="untimed runs before the timed ones")
    p.add_argument("--runs", type=int, default=1, help="timed runs; medians are printed")
    p.add_argument("--timings-json", default=None, help="write per-run timings and medians here")
    return p


def check_args(args) -> None:
    """Everything that can be checked before loading gigabytes of weights."""
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    check_common_args(args)
    if os.path.splitext(args.output)[1].lower() != ".png":  # the settings go into the PNG's text chunks
        raise UserError(f"--output {args.output}: images are written as PNG, give a name ending in .png")
    check_writable(args.output, args.timings_json)


MAX_SIDE = 2048  # per side: the largest size measured (README: 2048x2048); far beyond, the schedule overflows
MEMORY_SAVERS = "a smaller --height/--width or --batch-size"


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
    args = build_parser().parse_args(argv)
    warn.cache_clear()
    try:
        check_args(args)
        dtype = getattr(torch, args.dtype)
        pipe = load_pipeline(args.model, args.device, dtype, args.random_weights)
        check_size(args.height, args.width, pipe.vae_scale_factor)
        cfg = pipe.cfg
        req = Request([args.prompt] * args.batch_size, [args.prompt_2 or args.prompt] * args.batch_size,
                      args.height, args.width,
                      args.steps or cfg.default_steps,
                      cfg.default_guidance if args.guidance is None else args.guidance,
                      [args.seed + i for i in range(args.batch_size)],
                      args.max_sequence_length or cfg.max_sequence_length)
        images, per_run, warmup_s = timed_runs(pipe, req, args.warmup, args.runs)
        summary = summarize(per_run, warmup_s, pipe.device)
        for key in ("text_encoders", "denoiser", "vae"):
            print(f"{key} time: {summary[key]['median']:.3f}s")
        print(f"end-to-end time: {summary['end_to_end']['median']:.3f}s")
        stem, ext = os.path.splitext(args.output)
        for i, image in enumerate(images):
            path = args.output if len(images) == 1 else f"{stem}-{i}{ext}"
            save_png(image, path, {
                "prompt": args.prompt, "prompt_2": args.prompt_2 or args.prompt, "seed": req.seeds[i],
                "steps": req.steps, "guidance": req.guidance, "size": f"{req.width}x{req.height}",
                "model": pipe.model_name, "random_weights": args.random_weights,
            })
            print(f"saved {path}")
        if args.timings_json:
            with open(args.timings_json, "w") as f:
                json.dump({"script": os.path.basename(__file__), "args": vars(args), **summary}, f, indent=1)
    except (UserError, MemoryError, RuntimeError) as e:  # a RuntimeError only if out of memory (as_user_error)
        print(f"error: {as_user_error(e, args.batch_size, args.height, args.width)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
