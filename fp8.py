"""--quantize fp8 for optimized_inference.py: the blocks' linear layers in float8 e4m3, and --compare-bf16, which
measures what that does to the velocity and the image.

Imported only when --quantize fp8 is given (gpt-fast's quantize.py pattern): the default bf16 path never loads it.
Quantization is the last load-time transform (optimized_inference.load_transformer's order): it sees the fused and
permuted weights. On the CPU torch emulates float8 matmuls, so all of this runs in the CPU tests too.
--fp8-fused-quant (on by default with fp8): Triton kernels that make each fp8 matmul's input in one pass per row
(section below); on the CPU their ops compute the same in torch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optimized_inference import (
    AdaNorm,
    DoubleStreamBlock,
    Flux,
    Pipeline,
    Request,
    SingleStreamBlock,
    Timer,
    UserError,
    gelu_tanh,
    generate,
)

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: float8 e4m3 has 4 exponent bits, 3 mantissa bits


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q, scale): float8 e4m3 values and one float32 scale per row [..., 1], with x ~ q * scale.

    Each row is scaled so that its largest magnitude lands on 448, e4m3's largest value; the 3-bit mantissa then
    rounds every element to within 2^-4 of itself (relative), down to 1/28672 of the row's maximum, where e4m3's
    subnormals begin. One scale per row (per output channel of a weight, per token of an activation): an outlier
    costs precision only in its own row. Plain torch ops, so torch.compile fuses them into the kernel producing x.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    # One reciprocal per row and a multiply per element, not a division per element (fewer instructions in the
    # compiled kernel). x * (448 / amax) can round to just past 448; a cast out of range saturates or gives NaN,
    # by torch version and device.
    return (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), amax / FP8_MAX


# Hopper's fp8 tensor cores accumulate with fewer bits than float32. "Fast" accumulation keeps the sums there for the
# whole reduction; the slower mode adds them into float32 registers every few steps. Fast is the usual choice for
# inference; the GPU test in tests/test_fp8.py measures the error and speed of both.
FP8_FAST_ACCUM = True


class Fp8Rows(NamedTuple):
    """An activation already quantized for a Float8Linear (--fp8-fused-quant): e4m3 values [..., K] and one float32
    scale per row [..., 1], as quantize_fp8 returns them, made by the kernel that computed the activation."""

    q: torch.Tensor
    scale: torch.Tensor


class Float8Linear(nn.Module):
    """An nn.Linear run in float8 e4m3 (--quantize fp8): twice bf16's tensor-core rate on Ada and Hopper GPUs.

    The weight is quantized once, per output channel; each call quantizes its input per token (unless it comes
    quantized already, as Fp8Rows), and one torch._scaled_mm multiplies the e4m3 operands, applies both scales, adds
    the bias and writes bf16.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_fp8(linear.weight.detach())
        # Stored [out, in] row-major, so weight.t() is the column-major [in, out] operand _scaled_mm requires.
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.reshape(1, -1))  # [1, out]: one scale per output column
        self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16))  # the fused bias must be bf16

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):  # quantized by the pass that made it (--fp8-fused-quant): nothing left to do
            lead, q, scale = x.q.shape[:-1], x.q.reshape(-1, self.in_features), x.scale.reshape(-1, 1)
        else:  # [tokens, in]: _scaled_mm takes 2-D operands
            lead, (q, scale) = x.shape[:-1], quantize_fp8(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.scale, bias=self.bias,
                               out_dtype=torch.bfloat16, use_fast_accum=FP8_FAST_ACCUM)
        return out.view(*lead, self.out_features)


@torch.no_grad()
def quantize_fp8_(model: Flux, keep_bf16: int = 0, fused: bool = True) -> Flux:
    """--quantize fp8: every linear layer inside the blocks becomes a Float8Linear, in place, once at load time.

    That is over 99.9% of a step's matmul FLOP; fused projections (to_qkv, to_added_qkv, to_qkv_mlp) are linear
    layers like the others. Left in bf16: the adaLN projections (with --precompute they run once per request, not
    per step: fp8 would add error and save nothing), the embedders and the final projection (outside the blocks,
    tiny), and with `keep_bf16` (--fp8-keep-bf16) that many blocks at each end of the model. `fused`
    (--fp8-fused-quant, on by default): the quantized blocks make their matmuls' inputs in one pass per row
    (use_fused_quant_).
    """
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    for block in blocks[keep_bf16:len(blocks) - keep_bf16]:
        adaln = {id(m.linear) for m in block.modules() if isinstance(m, AdaNorm)}
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and id(module) not in adaln:
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, Float8Linear(module))
        if fused:
            use_fused_quant_(block)
    return model


def bf16_twin(model: Flux) -> Flux:
    """A second Flux over the very same weight tensors (no copy): quantizing `model` afterwards leaves the twin in
    bf16, so --compare-bf16 costs only the fp8 weights (8.6 GB at FLUX.1-dev size)."""
    with torch.device("meta"):
        twin = Flux(model.cfg, model.opts)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# --fp8-fused-quant: each fp8 matmul's input made in one pass per row
# ----------------------------------------------------------------------------------------------------------------------
# Before every fp8 matmul the activation needs its per-token amax and its e4m3 cast. Written as torch ops, inductor
# fuses them with what comes before (LayerNorm + modulate, or GELU), but its generated kernels ran at ~3x their memory
# time or worse (BENCHMARKS.md run 16: LN + modulate + quant 136 µs against 14 µs of memory traffic): a looped
# reduction reads each row several times, and evaluates GELU twice. The kernels below keep the whole row in registers:
# one read, one e4m3 write, one scale per row.
#
# Each is launched by an opaque torch.library.custom_op (as attention_fp8.py wraps cuDNN): torch.compile traces the
# op as one call whose output shapes its fake implementation gives (symbolic token counts: dynamic shapes), inductor
# calls it with real tensors, and on CUDA tensors the op launches the Triton kernel itself. Run 31 (H200) had them as
# torch.library.triton_op, which hands the kernel to inductor's user-kernel machinery (mutation analysis,
# functionalization, its own launch code): it failed three ways there (a float argument typed fp64, an assertion in
# the decomposition of the functional kernel wrapper, NaN with static shapes after a failed mutation analysis). The
# kernels are the whole fusion, so nothing is lost by inductor not seeing inside. What the launch needs for CUDA graphs:
# outputs from torch.empty (torch's allocator: the graph's pool while capturing), the current stream (Triton launches
# on torch's), no host sync, and the kernel compiled before the capture (CUDAGraphStep's warm-up calls).
# Elsewhere (the CPU tests, eager fp8 on the CPU) the op computes the same math in torch: float32 from the inputs, one
# rounding at the cast.
#
# Which call sites (use_fused_quant_ swaps the blocks' functions, as Flux.set_attention swaps the attention kernel):
#   modulate      LayerNorm + modulate + quant: the q/k/v input of both streams, the single blocks' fused input
#   add_modulate  the gated residual add x + gate * y, then the same: the double blocks' MLP inputs (inductor fused
#                 the residual add into the LayerNorm's kernel; so does this one, writing the new residual too)
#   act           GELU + quant: the double blocks' second MLP matmul
#   cat_act       [attention | GELU(MLP)] + quant: the single blocks' output projection
# The attention outputs (to_out, to_add_out) stay with Float8Linear's own quantize_fp8, fused by inductor.
LN_EPS = 1e-6  # modulate's LayerNorm


@functools.cache
def triton_kernels() -> SimpleNamespace:
    """The Triton kernels, built on first use: Triton ships with PyTorch's CUDA builds, not with the CPU ones. One
    program per token (grid (tokens, batch)); input rows are read at (batch, token) strides with unit stride along
    the width, so slices of wider tensors need no copy; outputs are contiguous [batch, tokens, width]. Every argument
    is a tensor, an int or a constexpr (no float: a float argument is typed by whoever generates the launch, and run
    31's inductor typed it fp64, which the cast to e4m3 then refused). With TRITON_INTERPRET=1 set before triton is
    first imported, Triton's interpreter runs them on CPU tensors (tests/test_fp8.py)."""
    import triton
    import triton.language as tl

    @triton.jit
    def ln_modulate_quant(x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, x_out_ptr, q_ptr, s_ptr,
                          x_sb, x_ss, y_sb, y_ss, gate_sb, shift_sb, scale_sb,
                          N: tl.constexpr, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, EPS: tl.constexpr):
        # [RESIDUAL: x = x + gate * y, stored] LayerNorm without affine, (1 + scale) x + shift, the row's amax and the
        # e4m3 cast, as quantize_fp8(modulate(x)) computes them, in float32 without eager's bf16 roundings between.
        tok, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # int64: no offset overflows
        row = b * tl.num_programs(0) + tok  # in the contiguous outputs
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + b * x_sb + tok * x_ss + cols, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            gate = tl.load(gate_ptr + b * gate_sb + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + b * y_sb + tok * y_ss + cols, mask=mask, other=0.0).to(tl.float32)
            x_new = (x + gate * y).to(x_out_ptr.dtype.element_ty)  # the residual stream, in its dtype (bf16)
            tl.store(x_out_ptr + row * N + cols, x_new, mask=mask)
            x = x_new.to(tl.float32)
        mean = tl.sum(x, axis=0) / N  # masked lanes loaded as 0: the sum is the row's
        centered = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + EPS)
        scale = tl.load(scale_ptr + b * scale_sb + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b * shift_sb + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.where(mask, centered * rstd * (1.0 + scale) + shift, 0.0)  # 0 past the row's end: not in the amax
        amax = tl.maximum(tl.max(tl.abs(h), axis=0), 1e-12)
        q = tl.clamp(h * (448.0 / amax), -448.0, 448.0)  # 448: e4m3's largest value, as in quantize_fp8
        tl.store(q_ptr + row * N + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, amax / 448.0)

    @triton.jit
    def gelu_quant(a_ptr, h_ptr, q_ptr, s_ptr, a_sb, a_ss, h_sb, h_ss, N_A: tl.constexpr, N_H: tl.constexpr,
                   BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr):
        # The row [a | GELU(h)] (a part of width 0 is absent), its amax and the e4m3 cast. GELU (gelu_tanh's sigmoid
        # form) is evaluated once per element; inductor's looped reduction evaluated it twice (amax, then cast).
        tok, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        row = b * tl.num_programs(0) + tok
        amax = tl.full((), 1e-12, tl.float32)
        if N_A > 0:
            cols_a = tl.arange(0, BLOCK_A)
            a = tl.load(a_ptr + b * a_sb + tok * a_ss + cols_a, mask=cols_a < N_A, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=0))
        if N_H > 0:
            cols_h = tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + b * h_sb + tok * h_ss + cols_h, mask=cols_h < N_H, other=0.0).to(tl.float32)
            # sqrt(8 / pi); sigmoid's argument kept within ±80 (where it is 1 or < 2e-35 in float32): no inf inside
            # the kernel however the GPU's approximate exp and division treat one (h in the hundreds makes |u| ~1e8)
            u = tl.minimum(tl.maximum(1.5957691216057308 * (h + 0.044715 * h * h * h), -80.0), 80.0)
            g = h * tl.sigmoid(u)  # GELU(0) = 0: masked lanes stay out of the amax
            amax = tl.maximum(amax, tl.max(tl.abs(g), axis=0))
        inv = 448.0 / amax
        if N_A > 0:
            q_a = tl.clamp(a * inv, -448.0, 448.0)
            tl.store(q_ptr + row * (N_A + N_H) + cols_a, q_a.to(tl.float8e4nv), mask=cols_a < N_A)
        if N_H > 0:
            q_h = tl.clamp(g * inv, -448.0, 448.0)
            tl.store(q_ptr + row * (N_A + N_H) + N_A + cols_h, q_h.to(tl.float8e4nv), mask=cols_h < N_H)
        tl.store(s_ptr + row, amax / 448.0)

    return SimpleNamespace(ln_modulate_quant=ln_modulate_quant, gelu_quant=gelu_quant,
                           next_power_of_2=triton.next_power_of_2)


def quantized_outputs(x: torch.Tensor, width) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty e4m3 values [batch, tokens, width] and float32 row scales [batch, tokens, 1] for x [batch, tokens, ...],
    contiguous (the ops' fake implementations make the same, with symbolic sizes)."""
    b, t = x.shape[:2]
    return (torch.empty(b, t, width, device=x.device, dtype=torch.float8_e4m3fn),
            torch.empty(b, t, 1, device=x.device, dtype=torch.float32))


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t [B, S, N] or [B, N] with unit stride along the width, which the kernels assume: whatever strides a compiled
    graph hands the op, a row is then read right (a copy only where the width is strided)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def launch(kernel, grid, device: torch.device, *args, **constants) -> None:
    """The kernel on the tensors' device (Triton launches on the current device, on torch's current stream)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **constants)
    else:  # Triton's interpreter (TRITON_INTERPRET=1): CPU tensors
        kernel[grid](*args, **constants)


def triton_ln_modulate_quant(x, shift, scale, gate=None, y=None, num_warps: int = 8):
    """x [B, S, N], shift/scale/gate [B, N], y like x -> (x + gate y or None, q, s): the Triton kernel's launch (the
    ops below call it on CUDA tensors; tests and profiling.py's levers call it directly). Any strides but along the
    width; the outputs are contiguous."""
    k = triton_kernels()
    x = unit_stride(x)
    (batch, tokens, n), residual = x.shape, gate is not None
    # [B, N] or [1, N] (broadcast over the batch as modulate's scale[:, None] is: batch stride 0)
    shift, scale = (unit_stride(t.expand(batch, n)) for t in (shift, scale))
    q, s = quantized_outputs(x, n)
    if residual:
        gate, y = unit_stride(gate.expand(batch, n)), unit_stride(y.expand(batch, tokens, n))
        x_out = torch.empty(batch, tokens, n, device=x.device, dtype=x.dtype)
    else:  # gate, y and x_out are never read nor written: stand-in pointers
        gate, y, x_out = shift, x, q
    if x.numel():
        launch(k.ln_modulate_quant, (tokens, batch), x.device,
               x, gate, y, shift, scale, x_out, q, s, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
               gate.stride(0), shift.stride(0), scale.stride(0), N=n, BLOCK=k.next_power_of_2(n),
               RESIDUAL=residual, EPS=LN_EPS, num_warps=num_warps)
    return (x_out if residual else None), q, s


def triton_gelu_quant(a, h, num_warps: int = 16):
    """quantize_fp8(cat([a, gelu_tanh(h)], -1)) as one kernel, either part optional (None); a and h [B, S, width]
    (h may be a column slice of a wider tensor, as the single blocks' MLP input is; any strides but along the width)
    -> (q, s), contiguous."""
    k = triton_kernels()
    a, h = (None if t is None else unit_stride(t) for t in (a, h))
    present = h if h is not None else a
    if a is not None and h is not None:
        assert a.shape[:2] == h.shape[:2], (a.shape, h.shape)
    widths = [0 if t is None else t.shape[-1] for t in (a, h)]  # constants of the kernel
    q, s = quantized_outputs(present, sum(widths))
    a, h = (present if t is None else t for t in (a, h))  # an absent part is never read: a stand-in pointer
    if present.numel():
        launch(k.gelu_quant, (present.shape[1], present.shape[0]), present.device,
               a, h, q, s, a.stride(0), a.stride(1), h.stride(0), h.stride(1), N_A=widths[0], N_H=widths[1],
               BLOCK_A=k.next_power_of_2(widths[0]) if widths[0] else 0,
               BLOCK_H=k.next_power_of_2(widths[1]) if widths[1] else 0, num_warps=num_warps)
    return q, s


# The ops. On CUDA tensors each launches its Triton kernel; on any other device it computes the same in torch. The
# outputs are new contiguous tensors in both (the fake implementations promise exactly that to the compiled graph).
TRITON_DEVICES = {"cuda"}  # where the ops launch the Triton kernels; tests add "cpu" under TRITON_INTERPRET=1


def fused_on(t: torch.Tensor) -> bool:
    return t.device.type in TRITON_DEVICES


def torch_ln_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    q, s = quantize_fp8(F.layer_norm(x.float(), x.shape[-1:], eps=LN_EPS) * (1 + scale.float()[:, None])
                        + shift.float()[:, None])
    return q.contiguous(), s.contiguous()


@torch.library.custom_op("flux::ln_modulate_quant", mutates_args=())
def ln_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(modulate(x, shift, scale)) in one pass per row: (q [B, S, N], s [B, S, 1])."""
    if fused_on(x):
        return triton_ln_modulate_quant(x, shift, scale)[1:]
    return torch_ln_modulate_quant(x, shift, scale)


@ln_modulate_quant.register_fake
def _(x, shift, scale):
    return quantized_outputs(x, x.shape[-1])


@torch.library.custom_op("flux::add_ln_modulate_quant", mutates_args=())
def add_ln_modulate_quant(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                          scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x + gate y (the new residual stream, in x's dtype), and its quantize_fp8(modulate(...)), in one pass per row."""
    if fused_on(x):
        return triton_ln_modulate_quant(x, shift, scale, gate, y)
    x = (x.float() + gate.float()[:, None] * y.float()).to(x.dtype).contiguous()
    return x, *torch_ln_modulate_quant(x, shift, scale)


@add_ln_modulate_quant.register_fake
def _(x, gate, y, shift, scale):
    return (torch.empty(x.shape, device=x.device, dtype=x.dtype), *quantized_outputs(x, x.shape[-1]))


@torch.library.custom_op("flux::gelu_quant", mutates_args=())
def gelu_quant(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(gelu_tanh(h)) in one pass per row."""
    if fused_on(h):
        return triton_gelu_quant(None, h)
    q, s = quantize_fp8(gelu_tanh(h.float()))
    return q.contiguous(), s.contiguous()


@gelu_quant.register_fake
def _(h):
    return quantized_outputs(h, h.shape[-1])


@torch.library.custom_op("flux::cat_gelu_quant", mutates_args=())
def cat_gelu_quant(a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(cat([a, gelu_tanh(h)], -1)) in one pass per row."""
    if fused_on(h):
        return triton_gelu_quant(a, h)
    q, s = quantize_fp8(torch.cat([a.float(), gelu_tanh(h.float())], dim=-1))
    return q.contiguous(), s.contiguous()


@cat_gelu_quant.register_fake
def _(a, h):
    return quantized_outputs(h, a.shape[-1] + h.shape[-1])


# The blocks' functions (optimized_inference: modulate, add_modulate, FeedForward.act, cat_act), quantizing.
def modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> Fp8Rows:
    return Fp8Rows(*torch.ops.flux.ln_modulate_quant(x, shift, scale))


def add_modulate_fp8(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                     scale: torch.Tensor) -> tuple[torch.Tensor, Fp8Rows]:
    x, q, s = torch.ops.flux.add_ln_modulate_quant(x, gate, y, shift, scale)
    return x, Fp8Rows(q, s)


def gelu_fp8(h: torch.Tensor) -> Fp8Rows:
    return Fp8Rows(*torch.ops.flux.gelu_quant(h))


def cat_gelu_fp8(a: torch.Tensor, h: torch.Tensor, act) -> Fp8Rows:
    # act, the block's GELU (gelu_tanh, or F.gelu's tanh form with --no-sigmoid-gelu), is the function the kernel
    # evaluates, in gelu_tanh's sigmoid form
    return Fp8Rows(*torch.ops.flux.cat_gelu_quant(a, h))


FUSED_QUANT = (modulate_fp8, add_modulate_fp8, gelu_fp8, cat_gelu_fp8)


def use_fused_quant_(block: DoubleStreamBlock | SingleStreamBlock) -> None:
    """--fp8-fused-quant: a quantized block's functions that make its fp8 matmuls' inputs, swapped for the ones above,
    which hand the Float8Linear layers Fp8Rows. The bf16 blocks keep optimized_inference's own functions."""
    block.modulate = modulate_fp8
    if isinstance(block, DoubleStreamBlock):
        block.add_modulate = add_modulate_fp8
        block.ff.act = block.ff_context.act = gelu_fp8
    else:
        block.cat_act = cat_gelu_fp8


def fused_quant_functions(model: nn.Module) -> int:
    """How many of the model's swappable functions are the fused ones (describe()'s evidence)."""
    return sum(getattr(m, name, None) in FUSED_QUANT for m in model.modules()
               for name in ("modulate", "add_modulate", "act", "cat_act"))


def check_fp8_args(args) -> None:
    """The fp8 flags' own checks, before anything is loaded."""
    if args.compare_bf16 and args.quantize != "fp8":
        raise UserError("--compare-bf16 measures fp8's error: it needs --quantize fp8")
    if args.fp8_keep_bf16 and args.quantize != "fp8":
        raise UserError("--fp8-keep-bf16 needs --quantize fp8")
    if args.fp8_keep_bf16 < 0:
        raise UserError(f"--fp8-keep-bf16 must be >= 0, got {args.fp8_keep_bf16}")
    if args.quantize == "fp8" and args.dtype != "bfloat16":
        raise UserError(f"--quantize fp8 runs around its float8 matmuls in bfloat16, not --dtype {args.dtype}")


def check_fp8_support(device: torch.device) -> None:
    """float8 matmuls run on GPUs of compute capability 8.9 or newer (L4, L40S, H100, B200); on the CPU torch
    emulates them (slowly), so the whole fp8 path runs in the CPU tests too."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise UserError(f"--quantize fp8 needs float8 tensor cores (compute capability 8.9 or newer, e.g. L4, H100); "
                        f"{torch.cuda.get_device_name(device)} has {capability}")
    try:  # the rowwise-scaled matmul itself, which older torch builds lack on some devices
        probe = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        Float8Linear(nn.Linear(16, 16, device=device, dtype=torch.bfloat16))(probe)
    except (RuntimeError, NotImplementedError) as e:
        raise UserError(f"--quantize fp8: torch {torch.__version__} has no rowwise-scaled float8 matmul on "
                        f"{device} ({str(e).splitlines()[0]})") from e



# ----------------------------------------------------------------------------------------------------------------------
# --compare-bf16: fp8's error against the bf16 model it was quantized from
# ----------------------------------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 images [..., H, W, 3] (Wang et al. 2004: 11x11 Gaussian window of sigma
    1.5, over the window positions inside the image), averaged over positions, channels and images; 1: identical."""
    x, y = (torch.from_numpy(im.reshape(-1, *im.shape[-3:]).transpose(0, 3, 1, 2).astype(np.float64))
            .flatten(0, 1)[:, None] for im in (a, b))  # [images * 3, 1, H, W]: each channel on its own
    g = torch.exp(-((torch.arange(11) - 5) ** 2) / (2 * 1.5**2)).double()
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    mean = lambda t: F.conv2d(t, window)  # noqa: E731  local means under the window
    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean().item()


class Tandem(nn.Module):
    """The bf16 model, with the fp8 model run beside it on the very same inputs (--compare-bf16).

    The sampler follows the bf16 velocities; the fp8 error of every step is recorded, so it is the model's error
    alone, not the drift between two trajectories. The conditioning layers are the same tensors in both models.
    """

    def __init__(self, bf16: Flux, fp8: Flux):
        super().__init__()
        self.bf16, self.fp8 = bf16, fp8
        self.errors: list[torch.Tensor] = []  # relative error of the fp8 velocity, per step, left on the device

    def condition(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.bf16.condition(*args, **kwargs)

    def forward(self, img: torch.Tensor, **cond) -> torch.Tensor:
        v = self.bf16(img, **cond)
        self.errors.append((self.fp8(img, **cond).float() - v.float()).norm() / v.float().norm())
        return v


def compare_bf16(pipe: Pipeline, req: Request) -> dict:
    """fp8's error against the bf16 model it was quantized from, on this request (--compare-bf16).

    Both run eagerly (no compile, no CUDA graphs), so fp8 is the only difference between them: the velocity error
    along the bf16 trajectory (Tandem), and PSNR and SSIM of the fp8 image against the bf16 image of the same seed.
    The compiled fp8 step rounds some values the other way (it quantizes activations that eager first rounds to
    bf16), at the same error level: it measures the error, not the very pixels of the compiled run.
    """
    eager = dataclasses.replace(pipe.opts, compile=False, cuda_graphs=False)
    tandem = Tandem(pipe.bf16_transformer, pipe.transformer)
    with torch.compiler.set_stance("force_eager"):  # the compiled blocks and VAE decoder too
        bf16_images = generate(dataclasses.replace(pipe, transformer=tandem, opts=eager, steps=OrderedDict()), req,
                               Timer(pipe.device))
        fp8_images = generate(dataclasses.replace(pipe, opts=eager, steps=OrderedDict()), req, Timer(pipe.device))
    errors = [e.item() for e in tandem.errors]
    report = {"velocity_rel_err_first_step": errors[0], "velocity_rel_err_last_step": errors[-1],
              "velocity_rel_err_max": max(errors), "image_psnr_db": psnr(fp8_images, bf16_images),
              "image_ssim": ssim(fp8_images, bf16_images)}
    print(f"fp8 vs bf16 (eager, seed {req.seeds[0]}): velocity relative error {errors[0]:.4f} at the first step, "
          f"{errors[-1]:.4f} at the last (max {max(errors):.4f}); image PSNR {report['image_psnr_db']:.2f} dB, "
          f"SSIM {report['image_ssim']:.4f}")
    return report

