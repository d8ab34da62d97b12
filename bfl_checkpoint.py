"""Black Forest Labs' original single-file checkpoints (flux1-dev.safetensors) for optimized_inference.py.

    python optimized_inference.py --model flux1-dev.safetensors --text-encoders-from black-forest-labs/FLUX.1-dev

The file holds only the transformer, under BFL's key names: they are renamed (and the fused q/k/v split) into
diffusers' names, after which the usual load-time transforms and the strict load apply. Imported only for a
`.safetensors` --model.
"""

from __future__ import annotations

import os
import re

import torch

from optimized_inference import (
    COMPONENTS,
    Flux,
    FluxConfig,
    Options,
    UserError,
    config_from_checkpoint,
    load_weights_strict,
    prepare_state,
    read_json,
    read_safetensors,
    resolve_model_dir,
)

# Black Forest Labs' original single-file checkpoints (flux1-dev.safetensors) name things differently.
BFL_RENAMES = [  # (BFL key pattern, diffusers key) — applied to ".weight"/".bias"/".scale" stems
    (r"img_in", "x_embedder"), (r"txt_in", "context_embedder"),
    (r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    (r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    (r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"double_blocks\.(\d+)\.img_mod\.lin", r"transformer_blocks.\1.norm1.linear"),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", r"transformer_blocks.\1.norm1_context.linear"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm", r"transformer_blocks.\1.attn.norm_q"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm", r"transformer_blocks.\1.attn.norm_k"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm", r"transformer_blocks.\1.attn.norm_added_q"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm", r"transformer_blocks.\1.attn.norm_added_k"),
    (r"double_blocks\.(\d+)\.img_attn\.proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"double_blocks\.(\d+)\.img_mlp\.2", r"transformer_blocks.\1.ff.net.2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", r"transformer_blocks.\1.ff_context.net.0.proj"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", r"transformer_blocks.\1.ff_context.net.2"),
    (r"single_blocks\.(\d+)\.modulation\.lin", r"single_transformer_blocks.\1.norm.linear"),
    (r"single_blocks\.(\d+)\.norm\.query_norm", r"single_transformer_blocks.\1.attn.norm_q"),
    (r"single_blocks\.(\d+)\.norm\.key_norm", r"single_transformer_blocks.\1.attn.norm_k"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.proj_out"),
    (r"final_layer\.linear", "proj_out"), (r"final_layer\.adaLN_modulation\.1", "norm_out.linear"),
]


BFL_SPLITS = [  # one BFL matmul -> diffusers' separate ones, in output-row order
    (r"double_blocks\.(\d+)\.img_attn\.qkv", [r"transformer_blocks.\1.attn.to_" + p for p in "qkv"]),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv", [r"transformer_blocks.\1.attn.add_" + p + "_proj" for p in "qkv"]),
    (r"single_blocks\.(\d+)\.linear1", [r"single_transformer_blocks.\1.attn.to_" + p for p in "qkv"]
     + [r"single_transformer_blocks.\1.proj_mlp"]),
]


def bfl_to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """Rename (and split) a BFL-layout transformer state dict into diffusers' key names; unknown keys are kept as
    they are, so the strict load names them."""
    out = {}
    for key, tensor in state.items():
        stem, _, kind = key.rpartition(".")
        kind = "weight" if kind == "scale" else kind  # BFL's RMSNorm calls its weight "scale"
        for pattern, targets in BFL_SPLITS:
            if re.fullmatch(pattern, stem):
                sizes = [hidden] * 3 + ([tensor.shape[0] - 3 * hidden] if len(targets) == 4 else [])
                for target, part in zip(targets, tensor.split(sizes), strict=True):
                    out[f"{re.sub(pattern, target, stem)}.{kind}"] = part
                break
        else:
            for pattern, target in BFL_RENAMES:
                if re.fullmatch(pattern, stem):
                    if target == "norm_out.linear":  # BFL: (shift, scale); diffusers: (scale, shift)
                        tensor = torch.cat(tensor.chunk(2)[::-1])
                    out[f"{re.sub(pattern, target, stem)}.{kind}"] = tensor
                    break
            else:
                out[key] = tensor
    return out


def config_from_bfl(state: dict[str, torch.Tensor], scheduler_config: dict, axes_dims_rope=(16, 56, 56)) -> FluxConfig:
    """A single-file checkpoint has no config.json: read the sizes off the tensors' shapes (all but the RoPE split
    of the head dimension, which only a config states; FLUX.1's is the default)."""
    try:
        hidden, in_channels = state["img_in.weight"].shape
        head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        sizes = dict(
            in_channels=in_channels, attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
            num_layers=len({k.split(".")[1] for k in state if k.startswith("double_blocks.")}),
            num_single_layers=len({k.split(".")[1] for k in state if k.startswith("single_blocks.")}),
            joint_attention_dim=state["txt_in.weight"].shape[1],
            pooled_projection_dim=state["vector_in.in_layer.weight"].shape[1],
            guidance_embeds="guidance_in.in_layer.weight" in state, axes_dims_rope=axes_dims_rope,
        )
    except KeyError as e:
        raise UserError(f"not a FLUX transformer checkpoint in Black Forest Labs' layout: no {e.args[0]}") from e
    return config_from_checkpoint(sizes, scheduler_config)


def load_bfl_transformer(file: str, scheduler_config: dict, axes_dims_rope, opts: Options, device,
                         dtype) -> tuple[Flux, FluxConfig]:
    state = read_safetensors(file, device)
    cfg = config_from_bfl(state, scheduler_config, axes_dims_rope)
    with torch.device("meta"):
        model = Flux(cfg, opts)
    state = prepare_state(bfl_to_diffusers(state, cfg.hidden_size), cfg, opts)
    load_weights_strict(model, state, dtype, file)
    return model.eval(), cfg



def load_bfl_pipeline_parts(file: str, text_encoders_from: str | None, opts: Options, device,
                            dtype) -> tuple[Flux, FluxConfig, str]:
    """The transformer from `file`; returns it, its config and the diffusers directory with everything else."""
    if not os.path.isfile(file):
        raise UserError(f"--model {file!r} does not exist")
    if text_encoders_from is None:
        raise UserError("a single-file transformer checkpoint needs --text-encoders-from (a diffusers-layout "
                        "directory or hub id for the text encoders, tokenizers, VAE and scheduler)")
    path = resolve_model_dir(text_encoders_from, tuple(c for c in COMPONENTS if c != "transformer"))
    scheduler = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    config = os.path.join(path, "transformer", "config.json")
    axes = tuple(read_json(config)["axes_dims_rope"]) if os.path.exists(config) else (16, 56, 56)
    transformer, cfg = load_bfl_transformer(file, scheduler, axes, opts, device, dtype)
    return transformer, cfg, path
