"""--quantize fp8 for optimized_inference.py: the blocks' linear layers in float8 e4m3, and --compare-bf16, which
measures what that does to the velocity and the image.

Imported only when --quantize fp8 is given (gpt-fast's quantize.py pattern): the default bf16 path never loads it.
Quantization is the last load-time transform (optimized_inference.load_transformer's order): it sees the fused and
permuted weights. On the CPU torch emulates float8 matmuls, so all of this runs in the CPU tests too.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optimized_inference import AdaNorm, Flux, Pipeline, Request, Timer, UserError, generate

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


class Float8Linear(nn.Module):
    """An nn.Linear run in float8 e4m3 (--quantize fp8): twice bf16's tensor-core rate on Ada and Hopper GPUs.

    The weight is quantized once, per output channel; each call quantizes its input per token, and one
    torch._scaled_mm multiplies the e4m3 operands, applies both scales, adds the bias and writes bf16.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_fp8(linear.weight.detach())
        # Stored [out, in] row-major, so weight.t() is the column-major [in, out] operand _scaled_mm requires.
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.reshape(1, -1))  # [1, out]: one scale per output column
        self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16))  # the fused bias must be bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_fp8(x.reshape(-1, self.in_features))  # [tokens, in]: _scaled_mm takes 2-D operands
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.scale, bias=self.bias,
                               out_dtype=torch.bfloat16, use_fast_accum=FP8_FAST_ACCUM)
        return out.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_fp8_(model: Flux, keep_bf16: int = 0) -> Flux:
    """--quantize fp8: every linear layer inside the blocks becomes a Float8Linear, in place, once at load time.

    That is over 99.9% of a step's matmul FLOP; fused projections (to_qkv, to_added_qkv, to_qkv_mlp) are linear
    layers like the others. Left in bf16: the adaLN projections (with --precompute they run once per request, not
    per step: fp8 would add error and save nothing), the embedders and the final projection (outside the blocks,
    tiny), and with `keep_bf16` (--fp8-keep-bf16) that many blocks at each end of the model.
    """
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    for block in blocks[keep_bf16:len(blocks) - keep_bf16]:
        adaln = {id(m.linear) for m in block.modules() if isinstance(m, AdaNorm)}
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and id(module) not in adaln:
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, Float8Linear(module))
    return model


def bf16_twin(model: Flux) -> Flux:
    """A second Flux over the very same weight tensors (no copy): quantizing `model` afterwards leaves the twin in
    bf16, so --compare-bf16 costs only the fp8 weights (8.6 GB at FLUX.1-dev size)."""
    with torch.device("meta"):
        twin = Flux(model.cfg, model.opts)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


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

