"""--lora for optimized_inference.py: LoRAs fused into the transformer's weights, and swapped between prompts.

    python optimized_inference.py --lora style.safetensors --lora-scale 0.8 --prompt "..."

diffusers reads the file and converts it from whichever format it is in (diffusers/PEFT, kohya, xlabs, BFL) to
diffusers' key names (`FluxPipeline.lora_state_dict`). Each LoRA adds scale * (alpha / rank) * B A to its layer's
weight. The deltas are put through the same load-time transforms as the weights (optimized_inference.prepare_state:
RoPE's row permutation, the q/k/v fusion), so they land in the loaded model's own layout; fp8 quantization comes
after them. A swap (a prompts-file line with another "lora" list) writes base + new deltas into the same tensors,
from an exact copy of the touched weights' base values: no rounding accumulates, nothing recompiles, and the
captured CUDA graphs replay with the new weights. Imported only when a LoRA is asked for.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from optimized_inference import Flux, FluxConfig, Options, UserError, prepare_state


def read_lora(spec: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """A local .safetensors file, or `owner/repo:weight_name.safetensors` on the hub: (state, alphas, metadata)."""
    from diffusers import FluxPipeline

    source, weight_name = spec, None
    if not os.path.exists(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+:[\w./-]+", spec):
        source, weight_name = spec.split(":")
    elif not os.path.isfile(spec):
        raise UserError(f"--lora {spec!r}: no such file (a .safetensors file, or owner/repo:weight_name)")
    try:
        kwargs = {"weight_name": weight_name} if weight_name else {}
        state, alphas, metadata = FluxPipeline.lora_state_dict(source, return_alphas=True, return_lora_metadata=True,
                                                               **kwargs)
    except Exception as e:  # a file diffusers cannot read or convert: corrupt, not a LoRA, not FLUX's
        raise UserError(f"--lora {spec!r}: cannot read it as a FLUX LoRA ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return state, alphas or {}, metadata or {}


def lora_options(args) -> dict:
    """Options' LoRA fields from the flags: --lora with its --lora-scale (1.0 where none is given), and the files
    that --prompts-file lines switch to (their layers' base values are kept for the swaps)."""
    if len(args.lora_scale) > len(args.lora):
        raise UserError(f"{len(args.lora_scale)} --lora-scale for {len(args.lora)} --lora: one scale per LoRA at most")
    lora = tuple(zip(args.lora, args.lora_scale + [1.0] * (len(args.lora) - len(args.lora_scale))))
    if not args.prompts_file:
        return {"lora": lora}
    from prompts_file import lora_files

    return {"lora": lora, "lora_swaps": lora_files(args.prompts_file)}


def lora_scaling(module: str, rank: int, alphas: dict, metadata: dict) -> float:
    """alpha / rank as PEFT computes it: the file's per-module alpha, else its adapter config's (with alpha_pattern
    and rsLoRA), else alpha = rank."""
    if f"{module}.alpha" in alphas:
        return float(alphas[f"{module}.alpha"]) / rank
    if metadata.get("transformer.use_dora"):
        raise UserError("DoRA LoRAs are not supported (their magnitude vectors are not a low-rank delta)")
    alpha = metadata.get("transformer.lora_alpha", rank)
    for pattern, value in (metadata.get("transformer.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module.removeprefix("transformer.")):
            alpha = value
    return alpha / (math.sqrt(rank) if metadata.get("transformer.use_rslora") else rank)


def reference_shapes(cfg: FluxConfig) -> dict[str, torch.Size]:
    """Every weight's shape under diffusers' key names (the layout LoRA files are converted to)."""
    with torch.device("meta"):
        model = Flux(cfg, Options(fused_qkv=False))
    return {k: v.shape for k, v in model.state_dict().items()}


def lora_factors(spec: str, shapes: dict[str, torch.Size]) -> dict[str, tuple]:
    """{diffusers layer name: (B, A, alpha / rank, B's bias or None)} of one LoRA file, checked against the model's
    weight `shapes` (reference_shapes). The deltas (B A, as large as the weights) are made one block at a time."""
    state, alphas, metadata = read_lora(spec)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
    other = sorted(k for k in state if ".lora_" not in k)
    unknown = [m for m in modules if not m.startswith("transformer.") or f"{m[12:]}.weight" not in shapes]
    if other or unknown or not modules:
        some = (unknown + other)[:4]
        raise UserError(f"--lora {spec!r}: {len(unknown + other)} of its keys match no layer of this FLUX "
                        f"transformer (a LoRA for another model, or for the text encoders?), e.g. {', '.join(some)}"
                        if some else f"--lora {spec!r}: no LoRA weights in it")
    factors = {}
    for module in modules:
        a, b, name = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], module[12:]
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(shapes[f"{name}.weight"]):
            raise UserError(f"--lora {spec!r}: {module} has shapes B {tuple(b.shape)} A {tuple(a.shape)}, the layer "
                            f"{tuple(shapes[f'{name}.weight'])}: a LoRA for another model size")
        factors[name] = (b, a, lora_scaling(module, a.shape[0], alphas, metadata),
                         state.get(f"{module}.lora_B.bias"))
    return factors


def block_of(name: str) -> str:
    """The block a layer belongs to ("" for the layers outside the blocks): the unit prepare_state fuses within."""
    match = re.match(r"(?:single_)?transformer_blocks\.\d+\.", name)
    return match[0] if match else ""


def to_model_space(deltas: dict[str, torch.Tensor], shapes: dict[str, torch.Size], cfg: FluxConfig,
                   opts: Options) -> dict[str, torch.Tensor]:
    """The deltas in the loaded model's layout: prepare_state permutes and fuses them like the weights, with zeros
    for the layers of a fused group that the LoRA leaves alone."""
    full = dict(deltas)
    for key, delta in deltas.items():
        for part in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "proj_mlp"):
            sibling = f"{block_of(key)}{part}.{key.rsplit('.', 1)[1]}" if block_of(key) else None
            if sibling in shapes and sibling not in full:
                full[sibling] = torch.zeros(shapes[sibling], device=delta.device, dtype=delta.dtype)
    return prepare_state(full, cfg, opts)


class LoraWeights:
    """The LoRAs fused into a loaded model. Every weight that one of `swaps` (the LoRA files later requests may ask
    for) touches is copied to the CPU first, so that each new set of LoRAs is written onto the exact base values."""

    def __init__(self, model: Flux, swaps: set[str]):
        self.model, self.active, self.touched = model, (), set()  # touched: what the active LoRAs change
        self.shapes, self.files = reference_shapes(model.cfg), {}  # files: each LoRA file's factors, read once
        self.base: dict[str, torch.Tensor] = {}
        for spec in sorted(swaps):
            for name, (b, a, _, bias) in self.factors(spec).items():  # meta tensors: only the names matter
                kinds = ("weight", "bias") if bias is not None else ("weight",)
                shapes = {f"{name}.{k}": torch.empty(b.shape[0], *([a.shape[1]] if k == "weight" else []),
                                                     device="meta") for k in kinds}
                for key in to_model_space(shapes, self.shapes, model.cfg, model.opts):
                    if key not in self.base:
                        self.base[key] = pinned_copy(self.layer(key)[1])

    def factors(self, spec: str) -> dict[str, tuple]:
        if spec not in self.files:
            self.files[spec] = lora_factors(spec, self.shapes)
        return self.files[spec]

    def layer(self, key: str) -> tuple[nn.Module, torch.Tensor]:
        module = self.model.get_submodule(key.rpartition(".")[0])
        return module, getattr(module, key.rpartition(".")[2])

    @torch.no_grad()
    def apply(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Fuse `loras` ((file, scale), ...) in place of the current ones: base + the sum of their deltas, rounded
        once, into the same storage (the CUDA graphs hold its address); fp8 layers are quantized again. One block
        at a time, on the weights' device."""
        loras = tuple(loras)
        if loras == self.active:
            return
        factors = [(self.factors(spec), scale) for spec, scale in loras]
        device = next(self.model.parameters()).device
        touched = set()
        for block in sorted({block_of(n) for f, _ in factors for n in f} | {block_of(k) for k in self.base}):
            deltas: dict[str, torch.Tensor] = {}
            for f, scale in factors:
                for name, (b, a, alpha_over_rank, bias) in f.items():
                    if block_of(name) == block:
                        factor = scale * alpha_over_rank
                        parts = {"weight": factor * (b.to(device, torch.float32) @ a.to(device, torch.float32))}
                        if bias is not None:
                            parts["bias"] = factor * bias.to(device, torch.float32)
                        for kind, delta in parts.items():
                            key = f"{name}.{kind}"
                            deltas[key] = deltas[key] + delta if key in deltas else delta
            deltas = to_model_space(deltas, self.shapes, self.model.cfg, self.model.opts)
            if self.active and not set(deltas) <= set(self.base):
                raise RuntimeError("a swapped-in LoRA touches a weight whose base value was not kept")
            for key in sorted(set(deltas) | {k for k in self.base if block_of(k) == block}):
                self.write(key, deltas.get(key))
            touched |= set(deltas)
        self.active, self.touched = loras, touched

    def write(self, key: str, delta: torch.Tensor | None) -> None:
        module, tensor = self.layer(key)
        base = self.base.get(key, tensor)
        value = base.to(tensor.device, non_blocking=True)
        if delta is not None:  # rounded once to the weights' dtype, as a LoRA fused at load time is
            value = (value.float() + delta).to(base.dtype)
        if tensor.dtype == torch.float8_e4m3fn:  # fp8.Float8Linear's weight: its per-channel scales change too
            from fp8 import quantize_fp8

            weight, scale = quantize_fp8(value)
            tensor.copy_(weight)
            module.scale.copy_(scale.reshape(1, -1))
        else:
            tensor.copy_(value)


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy; page-locked when there is a GPU, so that swaps copy it back at full speed."""
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    return copy.copy_(tensor.detach())
