"""--lora (lora.py): LoRAs fused into the optimized model, against diffusers' own load_lora_weights + fuse_lora, on the
tiny pipeline in float32; swaps between prompts; bad LoRA files. The LoRAs are built here, offline, with PEFT (the
diffusers/PEFT format) and by renaming into kohya's format (written independently of diffusers' converter)."""

import functools
import os
import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

import optimized_inference as oi
from tests.helpers import (
    GUIDANCE,
    HEIGHT,
    MAX_SEQ,
    PROMPT,
    SEED,
    STEPS,
    WIDTH,
    check_bad_input,
    cli_args,
    max_pixel_diff,
    read_png,
    rel_err,
)

ALL_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
              "norm1.linear", "norm1_context.linear", "norm.linear"]


def make_peft_lora(model_dir: str, path: str, targets: list[str], rank: int, alpha: float, seed: int) -> str:
    """A LoRA trained by nobody: PEFT's random init of A and B (B not zero), saved the way diffusers saves them."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = FluxPipeline.from_pretrained(model_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(config)
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                   transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(path, "pytorch_lora_weights.safetensors")


# diffusers' module names -> kohya's (BFL layout, flattened with "_"), for the layers a kohya FLUX LoRA keeps apart.
TO_KOHYA = [(r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks_\1_img_attn_proj"),
            (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks_\1_txt_attn_proj"),
            (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks_\1_img_mlp_0"),
            (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks_\1_txt_mlp_2"),
            (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks_\1_linear2")]


def make_kohya_lora(path: str, rank: int = 4, alpha: float = 2.0, dim: int = 32, hidden: int = 128) -> str:
    """A kohya-format FLUX LoRA: a shared-down q/k/v LoRA on each double block's image attention (BFL's fused
    `img_attn_qkv`), and separate ones on a few other layers; alpha stored per layer."""
    gen = torch.Generator().manual_seed(11)
    state = {}
    shapes = {"proj": (dim, dim), "mlp_0": (hidden, dim), "mlp_2": (dim, hidden), "linear2": (dim, dim + hidden)}
    for i in range(2):
        names = {f"double_blocks_{i}_img_attn_qkv": (3 * dim, dim), f"double_blocks_{i}_img_attn_proj": shapes["proj"],
                 f"double_blocks_{i}_txt_attn_proj": shapes["proj"], f"double_blocks_{i}_img_mlp_0": shapes["mlp_0"],
                 f"double_blocks_{i}_txt_mlp_2": shapes["mlp_2"], f"single_blocks_{i}_linear2": shapes["linear2"]}
        for name, (out, inp) in names.items():
            state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) / inp**0.5
            state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) / rank**0.5
            state[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(state, path)
    return path


def kohya_as_peft(kohya: dict, dim: int = 32) -> dict:
    """The same LoRA in diffusers/PEFT names with alpha / rank folded into B: what our loader must come to."""
    out = {}
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:
        stem = key.removeprefix("lora_unet_").removesuffix(".lora_down.weight")
        down, up = kohya[key], kohya[key.replace("lora_down", "lora_up")]
        up = up * float(kohya[key.replace("lora_down.weight", "alpha")]) / down.shape[0]
        if stem.endswith("img_attn_qkv"):
            i = re.match(r"double_blocks_(\d+)", stem)[1]
            for j, part in enumerate(("to_q", "to_k", "to_v")):
                out[f"transformer_blocks.{i}.attn.{part}"] = (down, up[j * dim:(j + 1) * dim])
            continue
        for pattern, target in TO_KOHYA:
            m = re.fullmatch(target.replace(r"\1", r"(\d+)"), stem)
            if m:
                out[re.sub(r"\(\\d\+\)", m[1], pattern).replace("\\", "")] = (down, up)
    return out


@pytest.fixture(scope="module")
def loras(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"a": make_peft_lora(tiny_pipeline_dir, str(root / "a"), ALL_LINEAR, rank=4, alpha=8, seed=1),
            "b": make_peft_lora(tiny_pipeline_dir, str(root / "b"), ["to_q", "to_k", "proj_out"], rank=2, alpha=2,
                                seed=2),
            "kohya": make_kohya_lora(str(root / "kohya.safetensors"))}


def diffusers_image(model_dir: str, adapters: list[tuple[str, float]]) -> np.ndarray:
    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(adapters):
        pipe.load_lora_weights(path, adapter_name=f"l{i}")
    if len(adapters) == 1:
        pipe.fuse_lora(lora_scale=adapters[0][1])
    elif adapters:
        pipe.set_adapters([f"l{i}" for i in range(len(adapters))], [s for _, s in adapters])
        pipe.fuse_lora()
    image = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 max_sequence_length=MAX_SEQ, generator=torch.Generator("cpu").manual_seed(SEED),
                 output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


def our_image(model_dir: str, out, adapters: list[tuple[str, float]], *extra: str) -> np.ndarray:
    flags = [f for path, scale in adapters for f in ("--lora", path, "--lora-scale", str(scale))]  # repeated flags
    assert oi.main(cli_args(model_dir, str(out), "--warmup", "0", "--no-text-buckets", *extra) + flags) == 0
    return read_png(out)


@pytest.mark.parametrize("which,scale", [("a", 0.8), ("kohya", 1.0)], ids=["peft", "kohya"])
def test_lora_matches_diffusers(which, scale, loras, tiny_pipeline_dir, tmp_path):
    ours = our_image(tiny_pipeline_dir, tmp_path / "ours.png", [(loras[which], scale)])
    theirs = diffusers_image(tiny_pipeline_dir, [(loras[which], scale)])
    base = our_image(tiny_pipeline_dir, tmp_path / "base.png", [])
    assert max_pixel_diff(ours, theirs) <= 2
    assert max_pixel_diff(ours, base) > 20  # the LoRA changes the image
    with Image.open(tmp_path / "ours.png") as im:
        assert im.text["lora"] == str([(loras[which], scale)])


def test_kohya_names_reach_the_right_layers(loras, tiny_pipeline_dir):
    """Our deltas for the kohya file are B A (alpha / rank folded in) of the layer its name means in BFL's layout."""
    import lora

    cfg = oi.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, oi.Options(compile=False, cuda_graphs=False)).cfg
    factors = lora.lora_factors(loras["kohya"], lora.reference_shapes(cfg))
    expected = kohya_as_peft(load_file(loras["kohya"]))
    assert sorted(factors) == sorted(expected)
    for name, (down, up) in expected.items():
        b, a, factor, _ = factors[name]
        torch.testing.assert_close(factor * b.float() @ a.float(), up @ down)


def test_two_loras_at_once(loras, tiny_pipeline_dir, tmp_path):
    adapters = [(loras["a"], 1.0), (loras["b"], 0.5)]
    ours = our_image(tiny_pipeline_dir, tmp_path / "ours.png", adapters)
    assert max_pixel_diff(ours, diffusers_image(tiny_pipeline_dir, adapters)) <= 2
    assert max_pixel_diff(ours, our_image(tiny_pipeline_dir, tmp_path / "a.png", adapters[:1])) > 10


def test_scale_zero_gives_the_base_image_exactly(loras, tiny_pipeline_dir, tmp_path):
    assert np.array_equal(our_image(tiny_pipeline_dir, tmp_path / "zero.png", [(loras["a"], 0.0)]),
                          our_image(tiny_pipeline_dir, tmp_path / "base.png", []))


def test_fp8_with_a_lora_stays_close_to_bf16_with_it(loras, tiny_pipeline_dir, tmp_path):
    """fp8 quantizes the fused weights: its image with a LoRA is as close to bf16's with it as without."""
    from tests.helpers import psnr

    bf16 = our_image(tiny_pipeline_dir, tmp_path / "bf16.png", [(loras["a"], 0.8)], "--dtype", "bfloat16")
    fp8 = our_image(tiny_pipeline_dir, tmp_path / "fp8.png", [(loras["a"], 0.8)], "--dtype", "bfloat16",
                    "--quantize", "fp8")
    assert 25 < psnr(fp8, bf16) < float("inf")


@pytest.mark.parametrize("mode", [["--dtype", "float32"], ["--dtype", "bfloat16", "--quantize", "fp8"]],
                         ids=["float32", "fp8"])
def test_swaps_in_one_process_equal_separate_runs(mode, loras, tiny_pipeline_dir, tmp_path, capsys):
    """A prompts file switching A -> B -> none -> A: the images of runs with one LoRA each, bit for bit (in fp8 the
    swapped layers are quantized again, from the same bf16 values a LoRA fused at load time gives)."""
    plan = [[[loras["a"], 1.0]], [[loras["b"], 0.5]], [], [[loras["a"], 1.0]]]
    lines = [f'{{"prompt": "{PROMPT}", "seed": {SEED}, "lora": {str(p).replace(chr(39), chr(34))}}}' for p in plan]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    args = [a for a in cli_args(tiny_pipeline_dir, "x.png", "--no-text-buckets", *mode)
            if a not in ("--prompt", PROMPT, "--output", "x.png")]
    assert oi.main([*args, "--prompts-file", str(prompts), "--output-dir", str(tmp_path / "out")]) == 0
    assert "lora layers=" in capsys.readouterr().out
    for i, adapters in enumerate(plan):
        alone = our_image(tiny_pipeline_dir, tmp_path / f"alone{i}.png", [tuple(a) for a in adapters], *mode)
        assert np.array_equal(read_png(tmp_path / "out" / f"{i:04d}-{SEED}.png"), alone), i
    with Image.open(tmp_path / "out" / f"{1:04d}-{SEED}.png") as im:
        assert im.text["lora"] == str([[loras["b"], 0.5]])


@torch.no_grad()
def test_swaps_do_not_recompile(loras, tiny_pipeline_dir):
    """Compiled blocks (inductor on the CPU): a swap changes the weights' values, not the graphs."""
    import lora

    opts = oi.Options(attention="sdpa", compile=False, cuda_graphs=False, lora_swaps=(loras["a"], loras["b"]))
    pipe = oi.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts)
    assert isinstance(pipe.transformer.loras, lora.LoraWeights)
    torch._dynamo.reset()
    oi.compile_blocks(pipe.transformer)
    req = oi.Request([PROMPT], [PROMPT], HEIGHT, WIDTH, 2, GUIDANCE, [SEED], MAX_SEQ)
    images = []
    for adapters in [((loras["a"], 1.0),), ((loras["b"], 0.5),), (), ((loras["a"], 1.0),)]:
        pipe.transformer.loras.apply(adapters)
        counters["stats"].clear()
        images.append(oi.generate(pipe, req, oi.Timer(pipe.device)))
        if len(images) > 1:
            assert counters["stats"]["unique_graphs"] == 0, "a swap recompiled"
    assert np.array_equal(images[0], images[3]) and not np.array_equal(images[0], images[1])


BAD_LORAS = {
    "missing-file": (lambda d, loras: str(d / "nope.safetensors"), ["no such file"]),
    "not-safetensors": (lambda d, loras: write(d / "junk.safetensors", b"not a safetensors file at all"),
                        ["cannot read it as a FLUX LoRA"]),
    "another-architecture": (lambda d, loras: save(d / "sd.safetensors", {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 32),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(32, 4)}), ["match no layer"]),
    "wrong-shapes": (lambda d, loras: save(d / "big.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)}), ["another model size"]),
}


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def save(path, state: dict) -> str:
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize("case", list(BAD_LORAS))
def test_bad_lora_is_one_line_error(case, loras, tiny_pipeline_dir, tmp_path, capsys):
    make, needles = BAD_LORAS[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = make(tmp_path, loras)
    check_bad_input(oi.main, cli_args(tiny_pipeline_dir, str(out_dir / "o.png"), "--lora", path),
                    ["--lora", *needles], out_dir, capsys)


def test_more_scales_than_loras_is_refused(loras, tiny_pipeline_dir, tmp_path, capsys):
    args = cli_args(tiny_pipeline_dir, str(tmp_path / "o.png")) + ["--lora", loras["a"], "--lora-scale", "1",
                                                                   "--lora-scale", "2"]
    check_bad_input(oi.main, args, ["--lora-scale"], tmp_path, capsys)


# ----------------------------------------------------------------------------------------------------------------------
# GPU, FLUX.1-dev size (random weights): swaps under CUDA graphs, and fp8's error with a LoRA
# ----------------------------------------------------------------------------------------------------------------------
def full_size_lora(path, cfg, rank: int = 16, seed: int = 0) -> str:
    """A rank-16 LoRA on every linear layer of the 57 blocks, in diffusers' format (alpha = rank)."""
    gen = torch.Generator().manual_seed(seed)
    import lora

    state = {}
    for key, shape in lora.reference_shapes(cfg).items():
        if key.endswith(".weight") and len(shape) == 2 and key.startswith(("transformer_blocks", "single_")):
            name = f"transformer.{key.removesuffix('.weight')}"
            state[f"{name}.lora_A.weight"] = (torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5).bfloat16()
            state[f"{name}.lora_B.weight"] = (0.3 * torch.randn(shape[0], rank, generator=gen) / rank**0.5).bfloat16()
    save_file(state, str(path))
    return str(path)


def step_inputs(model, seed=0):
    gen = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    txt = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
    t, g = torch.full((1,), 0.5, device="cuda"), torch.full((1,), 3.5, device="cuda")
    cond = model.condition(txt, torch.zeros(512, 3, device="cuda"), oi.image_ids(128, 128, "cuda"), t, g, pooled)
    return x, cond


@pytest.mark.cuda
@torch.no_grad()
def test_full_size_swap_under_cuda_graphs(tmp_path, record_property):
    """Compiled blocks and a captured step: after a swap the graph replays the new weights (as eager computes with
    them), nothing recompiles or is captured again, and swapping back restores the weights bit for bit."""
    import time

    cfg = oi.CONFIGS["flux-dev"]
    a, b = (full_size_lora(tmp_path / f"{n}.safetensors", cfg, seed=s) for n, s in (("a", 1), ("b", 2)))
    opts = oi.effective_options(oi.Options(text_buckets=False, lora_swaps=(a, b)), torch.device("cuda"))
    pipe = oi.load_pipeline("black-forest-labs/FLUX.1-dev", "cuda", torch.bfloat16, opts, random_weights=True)
    model, loras = pipe.transformer, pipe.transformer.loras
    x, cond = step_inputs(model)
    one = torch.ones((), device="cuda")
    loras.apply(((a, 1.0),))
    weights_a = model.single_transformer_blocks[20].to_qkv_mlp.weight.clone()
    step = oi.step_function(pipe, x, one, cond)
    v_a = step(x, one, cond).float() - x.float()
    counters["stats"].clear()
    timings = []
    for adapters in (((b, 1.0),), ((a, 1.0),), ((b, 1.0),)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loras.apply(adapters)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - t0)
    v_b = step(x, one, cond).float() - x.float()
    with torch.compiler.set_stance("force_eager"):
        v_b_eager = oi.euler_step(model, x, one, cond).float() - x.float()
    fresh = oi.CUDAGraphStep(functools.partial(oi.euler_step, model), x, one, cond)  # captured anew
    v_fresh = fresh(x, one, cond).float() - x.float()
    errors = {"graph after swap vs eager": rel_err(v_b, v_b_eager), "before the swap (control)": rel_err(v_a, v_b)}
    print(f"\nswap times {[round(t, 2) for t in timings]} s for {len(loras.touched)} layers; {errors}")
    record_property("lora_swap", dict(swap_s=timings, layers=len(loras.touched), **errors))
    assert counters["stats"]["unique_graphs"] == 0 and len(pipe.steps) == 1
    assert torch.equal(v_b, v_fresh)  # the old graph with the new weights = a graph captured with them
    assert errors["graph after swap vs eager"] < 3e-2 and errors["before the swap (control)"] > 3 * 3e-2
    loras.apply(((a, 1.0),))
    assert torch.equal(model.single_transformer_blocks[20].to_qkv_mlp.weight, weights_a)


@pytest.mark.cuda
@torch.no_grad()
def test_fp8_error_with_a_lora_is_no_larger(tmp_path, record_property):
    """fp8 against bf16, the same random model with and without a full-size LoRA fused."""
    import fp8
    import lora

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 tensor cores on this GPU")
    cfg = oi.CONFIGS["flux-dev"]
    a = full_size_lora(tmp_path / "a.safetensors", cfg, seed=1)
    opts = oi.effective_options(oi.Options(compile=False, cuda_graphs=False), torch.device("cuda"))
    with oi.default_dtype(torch.bfloat16):
        with torch.device("meta"):
            model = oi.Flux(cfg, opts)
        model = oi.init_random_(model.to_empty(device="cuda")).eval().requires_grad_(False)
    loras = lora.LoraWeights(model, {a})
    x, cond = step_inputs(model, seed=3)
    errors = {}
    for name, adapters in (("without", ()), ("with", ((a, 1.0),))):
        loras.apply(adapters)
        quantized = fp8.quantize_fp8_(fp8.bf16_twin(model))
        errors[name] = rel_err(quantized(x, **cond), model(x, **cond))
        del quantized
    print(f"\nfp8 velocity error vs bf16, random weights: {errors}")
    record_property("fp8_lora_error", errors)
    assert errors["with"] <= 1.1 * errors["without"]
