"""The optimized implementation (optimized_inference.py) against the reference, one optimization at a time.

On CPU torch.compile and CUDA graphs are switched off (with a notice); everything else is checked here.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from PIL import Image
from transformers import T5TokenizerFast

import optimized_inference as oi
import single_file_inference as sfi
from tests.helpers import (
    GUIDANCE,
    HEIGHT,
    PROMPT,
    REPO_ROOT,
    SEED,
    WIDTH,
    check_bad_input,
    cli_args,
    max_pixel_diff,
    read_png,
    rel_err,
)
from tests.helpers import TINY as TINY_DIMS

TINY = dict(TINY_DIMS, scheduler=sfi.FLUX_DEV_SCHEDULER)
N_FUSED = 2 * TINY["num_layers"] + TINY["num_single_layers"]  # to_qkv + to_added_qkv per double, to_qkv_mlp per single

# All on (as far as a CPU allows), each one off, all off. Compilation and CUDA graphs need CUDA (tests/test_compile.py
# compiles on the CPU); regional compilation only changes how the compiler is asked.
CPU_BASE = oi.Options(attention="sdpa", compile=False, cuda_graphs=False)
NOT_ON_CPU = ("compile", "cuda_graphs", "regional_compile")
TOGGLES = [f.name for f in oi.OPTIMIZATIONS if f.default is True and f.name not in NOT_ON_CPU]
VARIANTS = {"all-on": CPU_BASE,
            **{f"no-{name}": dataclasses.replace(CPU_BASE, **{name: False}) for name in TOGGLES},
            "all-off": dataclasses.replace(CPU_BASE, **{name: False for name in TOGGLES})}


# ----------------------------------------------------------------------------------------------------------------------
# Models: a reference Flux with random weights and strong modulation, and the optimized Flux loaded from it
# ----------------------------------------------------------------------------------------------------------------------
def make_reference(guidance_embeds: bool) -> sfi.Flux:
    cfg = sfi.FluxConfig(**TINY, guidance_embeds=guidance_embeds)
    with torch.device("meta"):
        ref = sfi.Flux(cfg)
    ref = sfi.init_random_(ref.to_empty(device="cpu"), seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, sfi.AdaNorm):  # undo init_random_'s damping: modulations of order 1
                module.linear.weight.mul_(10)
            elif isinstance(module, sfi.QKNorm):  # init_random_ leaves them at exactly 1
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
    for name, p in ref.named_parameters():
        assert torch.isfinite(p).all(), name
    return ref.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def reference(request):
    return make_reference(request.param)


def make_optimized(ref: sfi.Flux, opts: oi.Options) -> oi.Flux:
    cfg = oi.FluxConfig(**TINY, guidance_embeds=ref.cfg.guidance_embeds)
    with torch.device("meta"):
        model = oi.Flux(cfg, opts)
    state = oi.prepare_state({k: v.clone() for k, v in ref.state_dict().items()}, cfg, opts)
    oi.load_weights_strict(model, state, torch.float32)
    return model.eval()


def make_inputs(guidance_embeds: bool, batch=2, h=6, w=10, txt_len=7, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, (h // 2) * (w // 2), 16, generator=gen)
    cond = dict(txt=torch.randn(batch, txt_len, 32, generator=gen), txt_ids=torch.zeros(txt_len, 3),
                img_ids=sfi.image_ids(h, w, "cpu"), timestep=torch.rand(batch, generator=gen) * 0.98 + 0.01,
                guidance=torch.full((batch,), 3.5) if guidance_embeds else None,
                pooled=torch.randn(batch, 24, generator=gen))
    return x, cond


def reference_velocity(ref, x, c):
    with torch.no_grad():
        return ref(x, c["img_ids"], c["txt"], c["txt_ids"], c["timestep"], c["guidance"], c["pooled"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_velocity_matches_reference(variant, reference):
    opts = VARIANTS[variant]
    model = make_optimized(reference, opts)
    x, cond = make_inputs(reference.cfg.guidance_embeds)
    expected = reference_velocity(reference, x, cond)
    with torch.no_grad():
        actual = oi.velocity(model, x, dict(cond))
    assert expected.std() > 0.1
    assert rel_err(actual, expected) < 1e-5
    # Sensitivity: the modulation reaches the output strongly enough that another timestep is far off.
    other = dict(cond, timestep=cond["timestep"].flip(0))
    assert rel_err(reference_velocity(reference, x, other), expected) > 1e-2


@pytest.mark.parametrize("variant", ["all-on", "no-fused_qkv", "no-bf16_rope"])
def test_precomputed_conditioning_matches_per_step(variant, reference):
    """condition() for all steps at once, rows step-major as denoise() builds them, sliced per step."""
    model = make_optimized(reference, VARIANTS[variant])
    x, cond = make_inputs(reference.cfg.guidance_embeds)
    batch, steps = x.shape[0], 3
    timesteps = torch.tensor([0.93, 0.61, 0.27])
    guidance_all = None if cond["guidance"] is None else torch.full((steps * batch,), 3.5)
    with torch.no_grad():
        pre = model.condition(cond["txt"], cond["txt_ids"], cond["img_ids"], timesteps.repeat_interleave(batch),
                              guidance_all, cond["pooled"].repeat(steps, 1))
        mods = pre.pop("mods").view(steps, batch, -1)
        outs = []
        for i in range(steps):
            per_step = dict(cond, timestep=timesteps[i].expand(batch))
            actual = oi.velocity(model, x, {**pre, "mods": mods[i]})
            assert rel_err(actual, oi.velocity(model, x, dict(per_step))) < 1e-5
            assert rel_err(actual, reference_velocity(reference, x, per_step)) < 1e-5
            outs.append(actual)
    assert rel_err(outs[0], outs[2]) > 1e-2  # the steps really differ


# ----------------------------------------------------------------------------------------------------------------------
# fuse_projections
# ----------------------------------------------------------------------------------------------------------------------
UNFUSED = ("attn.to_q.", "attn.to_k.", "attn.to_v.", "attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.",
           "proj_mlp.")


def test_fuse_projections_splits_back_exactly():
    ref = make_reference(True)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    fused = oi.fuse_projections({k: v.clone() for k, v in original.items()})
    dim, hidden = ref.cfg.hidden_size, int(ref.cfg.hidden_size * ref.cfg.mlp_ratio)
    for i in range(TINY["num_layers"]):
        p = f"transformer_blocks.{i}"
        for fused_name, parts in [("attn.to_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
                                  ("attn.to_added_qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])]:
            for kind in ("weight", "bias"):
                pieces = fused[f"{p}.{fused_name}.{kind}"].split(dim)
                assert len(pieces) == 3
                for piece, part in zip(pieces, parts):
                    assert torch.equal(piece, original[f"{p}.{part}.{kind}"]), (p, part, kind)
    for i in range(TINY["num_single_layers"]):
        p = f"single_transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            pieces = fused[f"{p}.to_qkv_mlp.{kind}"].split([dim, dim, dim, hidden])
            for piece, part in zip(pieces, ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]):
                assert torch.equal(piece, original[f"{p}.{part}.{kind}"]), (p, part, kind)
    assert not [k for k in fused if any(u in k for u in UNFUSED)]
    # Everything else passes through untouched.
    for key, value in original.items():
        if not any(u in key for u in UNFUSED):
            assert torch.equal(fused[key], value), key
    assert len(fused) == len(original) - 2 * (4 * TINY["num_layers"] + 3 * TINY["num_single_layers"])


def test_permute_rope_pairs_moves_only_q_and_k():
    """rope_halves reorders each head's q/k channels: pairs (2j, 2j+1) land at (j, j + D/2), nothing else moves."""
    ref = make_reference(True)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    permuted = oi.permute_rope_pairs({k: v.clone() for k, v in original.items()}, TINY["attention_head_dim"])
    d = TINY["attention_head_dim"]
    moved = [k for k in original if not torch.equal(permuted[k], original[k])]
    assert moved and all(k.rpartition(".")[0].endswith(oi.ROPE_PERMUTED) for k in moved)
    key = "transformer_blocks.0.attn.to_k.weight"
    heads, new = original[key].unflatten(0, (-1, d)), permuted[key].unflatten(0, (-1, d))
    assert torch.equal(new[:, : d // 2], heads[:, 0::2]) and torch.equal(new[:, d // 2:], heads[:, 1::2])
    assert torch.equal(permuted["single_transformer_blocks.0.attn.norm_q.weight"][: d // 2],
                       original["single_transformer_blocks.0.attn.norm_q.weight"][0::2])
    # per double block 4 projections (weight, bias) + 4 norms; per single block 2 projections + 2 norms
    assert len(moved) == 12 * TINY["num_layers"] + 6 * TINY["num_single_layers"]


def test_fused_model_has_only_fused_projections():
    model = make_optimized(make_reference(True), CPU_BASE)
    names = dict(model.named_modules())
    fused = [n for n, m in names.items() if isinstance(m, torch.nn.Linear)
             and n.rsplit(".", 1)[-1] in ("to_qkv", "to_added_qkv", "to_qkv_mlp")]
    assert len(fused) == N_FUSED
    assert not [n for n in names if any((n + ".").endswith(u) for u in UNFUSED)]
    unfused = make_optimized(make_reference(True), dataclasses.replace(CPU_BASE, fused_qkv=False))
    assert not [n for n, _ in unfused.named_modules() if n.endswith(("to_qkv", "to_added_qkv", "to_qkv_mlp"))]


# ----------------------------------------------------------------------------------------------------------------------
# The sampler: optimized denoise (in-graph Euler, precomputed conditioning) vs the reference loop
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precompute", [True, False], ids=["precompute", "no-precompute"])
@pytest.mark.parametrize("euler_in_graph", [True, False], ids=["euler-in-graph", "no-euler-in-graph"])
def test_denoise_matches_reference_loop(euler_in_graph, precompute, reference, capsys):
    opts = dataclasses.replace(CPU_BASE, euler_in_graph=euler_in_graph, precompute=precompute)
    model = make_optimized(reference, opts)
    pipe = oi.Pipeline(cfg=model.cfg, transformer=model, clip=None, t5=None, clip_tokenizer=None, t5_tokenizer=None,
                       vae=None, model_name="tiny", device=torch.device("cpu"), dtype=torch.float32, opts=opts)
    gen = torch.Generator().manual_seed(6)
    batch, h, w = 2, 6, 10
    noise = torch.randn(batch, 4, h, w, generator=gen)
    txt, pooled = torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 24, generator=gen)
    sigmas = sfi.flow_match_sigmas(3, (h // 2) * (w // 2), sfi.FLUX_DEV_SCHEDULER)
    guidance = GUIDANCE if reference.cfg.guidance_embeds else None

    expected = sfi.denoise(reference, noise, txt, pooled, sigmas, guidance)
    actual = oi.denoise(pipe, noise, txt, pooled, sigmas, guidance)
    assert actual.shape == expected.shape == noise.shape
    assert rel_err(actual, expected) < 1e-5
    assert rel_err(expected, noise) > 0.1  # the three steps moved the latents
    # One step fewer is far off: the comparison resolves single steps.
    assert rel_err(sfi.denoise(reference, noise, txt, pooled, sigmas[1:], guidance), expected) > 1e-3
    assert len(pipe.steps) == 1  # one step function per shape, reused for all steps


# ----------------------------------------------------------------------------------------------------------------------
# The CLI end to end on the tiny pipeline
# ----------------------------------------------------------------------------------------------------------------------
def recording(module, decoded: list):
    """`module.decode`, recording the latents it is handed (compared far more tightly than 8-bit pixels)."""
    real_decode = module.decode

    def decode(owner, latents, *args):
        decoded.append(latents.clone())
        return real_decode(owner, latents, *args)

    return decode


@pytest.fixture(scope="module")
def reference_images(tiny_pipeline_dir, tmp_path_factory):
    """The reference CLI's image and final latents, and diffusers FluxPipeline's image, for the same request."""
    out = tmp_path_factory.mktemp("reference") / "ref.png"
    decoded = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sfi, "decode", recording(sfi, decoded))
        assert sfi.main(cli_args(tiny_pipeline_dir, str(out))) == 0
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=GUIDANCE,
                 max_sequence_length=48, generator=torch.Generator("cpu").manual_seed(SEED),
                 output_type="np").images[0]
    (latents,) = decoded
    return read_png(out), (image * 255).round().astype(np.uint8), latents


ALL_OFF_FLAGS = [f"--no-{name.replace('_', '-')}" for name in TOGGLES]


def evidence(stdout: str) -> dict[str, str]:
    """The `optimizations:` line as {name: value}."""
    lines = [line for line in stdout.splitlines() if line.startswith("optimizations: ")]
    assert len(lines) == 1, stdout
    return dict(part.split("=", 1) for part in lines[0].removeprefix("optimizations: ").split(", "))


@pytest.mark.parametrize("flags", [["--no-text-buckets"], ALL_OFF_FLAGS], ids=["all-on", "all-off"])
def test_cli_matches_reference_and_diffusers(flags, tiny_pipeline_dir, reference_images, tmp_path, capsys,
                                            monkeypatch):
    reference_png, diffusers_png, reference_latents = reference_images
    capsys.readouterr()
    torch._dynamo.reset()  # the evidence counts dynamo's graphs and cache hits in this process: none from other tests
    torch._dynamo.utils.counters.clear()
    decoded = []
    monkeypatch.setattr(oi, "decode", recording(oi, decoded))
    out = tmp_path / "opt.png"
    assert oi.main(cli_args(tiny_pipeline_dir, str(out), *flags)) == 0
    stdout = capsys.readouterr().out
    ours = read_png(out)
    assert ours.std() > 10
    assert max_pixel_diff(ours, reference_png) <= 2
    assert max_pixel_diff(ours, diffusers_png) <= 2
    assert len(decoded) == 2  # the warm-up run and the timed run
    for latents in decoded:
        assert rel_err(latents, reference_latents) < 1e-5

    assert "note: no CUDA device: torch.compile and CUDA graphs are off" in stdout
    on = flags == ["--no-text-buckets"]
    n_attention, n_double = TINY["num_layers"] + TINY["num_single_layers"], TINY["num_layers"]
    assert evidence(stdout) == {
        "T5 tokens": "48", "conditioning": "once per request" if on else "every step",
        "fused projections": str(N_FUSED if on else 0), "rope": "float32",
        "rope over head halves": str(n_attention if on else 0), "rope per stream": str(n_double if on else 0),
        "attention": "sdpa", "sigmoid gelu": str(2 * n_double + TINY["num_single_layers"] if on else 0),
        "step": "euler_step" if on else "velocity", "compile": "off", "compiled graphs": "0 for 1 step shapes",
        "precompiled graphs loaded/compiled": "off", "compile cache hits/misses": "0/0",
        "vae built": "with the first image" if on else "at load", "vae compiled": "False",
        "cuda graphs": "0", "channels-last vae": str(on), "uint8 on": "cpu", "lora layers": "0",
        "fp8 linear layers": "0", "fp8 fused quant": "0"}
    for component in ("text_encoders", "denoiser", "vae"):
        assert re.search(rf"^{component} time: \d+\.\d{{3}}s$", stdout, re.MULTILINE), stdout
    with Image.open(out) as im:
        assert im.text["prompt"] == PROMPT and im.text["seed"] == str(SEED) and im.text["size"] == "56x40"


def test_cli_batch_matches_reference_batch(tiny_pipeline_dir, tmp_path, monkeypatch):
    """--batch-size 2 through the precomputed, step-major conditioning: the reference's images and latents."""
    ref_latents, opt_latents = [], []
    monkeypatch.setattr(sfi, "decode", recording(sfi, ref_latents))
    monkeypatch.setattr(oi, "decode", recording(oi, opt_latents))
    assert sfi.main(cli_args(tiny_pipeline_dir, str(tmp_path / "ref.png"), "--batch-size", "2")) == 0
    assert oi.main(cli_args(tiny_pipeline_dir, str(tmp_path / "opt.png"), "--batch-size", "2", "--no-text-buckets",
                            "--warmup", "0")) == 0
    (ref,), (opt,) = ref_latents, opt_latents
    assert opt.shape == ref.shape == (2, 4, HEIGHT // 4, WIDTH // 4)
    assert rel_err(opt, ref) < 1e-5
    for i in range(2):
        assert max_pixel_diff(read_png(tmp_path / f"opt-{i}.png"), read_png(tmp_path / f"ref-{i}.png")) <= 2


def test_text_buckets_round_t5_length_up_to_128(tiny_pipeline_dir):
    tok = T5TokenizerFast.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer_2")
    short = ["a cat on a red chair"]
    long_prompt = " ".join(["a photo of a cat sitting on a red chair"] * 10)
    assert 128 < len(tok(long_prompt).input_ids) < 256
    assert oi.tokenize(tok, short, 512, "T5", oi.TEXT_BUCKET).shape == (1, 128)
    assert oi.tokenize(tok, short, 48, "T5", oi.TEXT_BUCKET).shape == (1, 48)  # capped at --max-sequence-length
    assert oi.tokenize(tok, short, 512, "T5", 0).shape == (1, 512)  # --no-text-buckets
    assert oi.tokenize(tok, [long_prompt], 512, "T5", oi.TEXT_BUCKET).shape == (1, 256)
    assert oi.tokenize(tok, short + [long_prompt], 512, "T5", oi.TEXT_BUCKET).shape == (2, 256)
    exactly_128 = " ".join(["a"] * 127)  # 127 pieces and </s>: already a full bucket, not rounded up to 256
    assert len(tok(exactly_128).input_ids) == 128
    assert oi.tokenize(tok, [exactly_128], 512, "T5", oi.TEXT_BUCKET).shape == (1, 128)
    assert oi.tokenize(tok, [exactly_128 + " a"], 512, "T5", oi.TEXT_BUCKET).shape == (1, 256)
    # The bucketed ids are the unbucketed ids cut short: the same tokens, then padding.
    bucketed = oi.tokenize(tok, short, 512, "T5", oi.TEXT_BUCKET)
    assert torch.equal(bucketed, oi.tokenize(tok, short, 512, "T5", 0)[:, :128])
    n = len(tok(short[0]).input_ids)
    assert (bucketed[0, n:] == tok.pad_token_id).all() and (bucketed[0, :n] != tok.pad_token_id).all()


@pytest.mark.parametrize("text_buckets,expected_len", [(True, 128), (False, 512)])
def test_encode_prompt_uses_text_buckets(text_buckets, expected_len, tiny_pipeline_dir):
    opts = dataclasses.replace(CPU_BASE, text_buckets=text_buckets)
    pipe = oi.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts)
    txt, pooled = oi.encode_prompt(pipe, ["a cat"], ["a cat"], 512)
    assert txt.shape == (1, expected_len, 32) and pooled.shape == (1, 32)
    assert pipe.seen["t5_tokens"] == expected_len


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
def test_decode_matches_reference(channels_last, tiny_pipeline_dir):
    opts = dataclasses.replace(CPU_BASE, channels_last_vae=channels_last)
    pipe = oi.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts)
    pipe.vae = pipe.vae.build()  # --deferred-vae (the default) leaves it to the first image
    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir, subfolder="vae").eval()
    latents = 2 * torch.randn(2, 4, 10, 14, generator=torch.Generator().manual_seed(8))
    seen = []  # (input, output) of every vae.decode call

    def recording_decode(module):
        real_decode = module.decode

        def decode(z, return_dict=True):
            out = real_decode(z, return_dict=return_dict)
            seen.append((z.clone(), z.is_contiguous(memory_format=torch.channels_last), out[0].clone()))
            return out
        return decode

    vae.decode, pipe.vae.decode = recording_decode(vae), recording_decode(pipe.vae)
    expected = sfi.decode(vae, latents)
    actual = oi.decode(pipe, latents)
    (ref_in, _, ref_out), (opt_in, opt_channels_last, opt_out) = seen
    assert opt_channels_last == channels_last
    assert next(pipe.vae.parameters()).is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_err(opt_in, ref_in) < 1e-6
    assert rel_err(opt_out, ref_out) < 1e-5
    assert actual.shape == expected.shape == (2, 40, 56, 3) and actual.dtype == np.uint8
    assert max_pixel_diff(actual, expected) <= 1 and expected.std() > 10


def test_deferred_vae_imports_beside_the_first_denoise(tiny_pipeline_dir, monkeypatch):
    """--deferred-vae: loading imports no diffusers; the first image starts its import in a thread once the step is
    ready (on a GPU: captured, as a capture forbids other CUDA work) and before the steps run, then builds the VAE
    before the NaN check waits for the latents; once only, and with the images of a VAE built at load."""
    req = oi.Request(["a cat"], ["a cat"], HEIGHT, WIDTH, 2, GUIDANCE, [SEED], 48)
    at_load = oi.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, dataclasses.replace(CPU_BASE,
                                                                                            deferred_vae=False))
    assert isinstance(at_load.vae, torch.nn.Module)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "diffusers", None)  # any import of diffusers during the load fails
        pipe = oi.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, CPU_BASE)
    assert isinstance(pipe.vae, oi.DeferredVAE) and pipe.vae_scale_factor == at_load.vae_scale_factor == 4
    events = []

    def record(name, fn):
        return lambda *args, **kwargs: events.append(name) or fn(*args, **kwargs)

    original_step_function = oi.step_function
    monkeypatch.setattr(oi, "step_function", lambda *args: events.append("step ready") or record(
        "step", original_step_function(*args)))
    deferred = pipe.vae
    monkeypatch.setattr(deferred, "start_import", record("import", deferred.start_import))
    monkeypatch.setattr(deferred, "build", record("build", deferred.build))
    monkeypatch.setattr(torch, "isfinite", record("wait", torch.isfinite))
    monkeypatch.setattr(oi, "decode", record("decode", oi.decode))
    first = oi.generate(pipe, req, oi.Timer(pipe.device))
    assert not deferred.thread.is_alive() and "diffusers.models.autoencoders.autoencoder_kl" in sys.modules
    assert events.index("step ready") < events.index("import") and events[-3:] == ["build", "wait", "decode"]
    assert events.count("step") == 2 and events.index("step ready") < events.index("step") < events.index("build")
    assert isinstance(pipe.vae, torch.nn.Module) and pipe.seen["vae_built"] == "with the first image"
    second = oi.generate(pipe, req, oi.Timer(pipe.device))
    assert events.count("build") == 1 and events.count("import") == 1
    expected = oi.generate(at_load, req, oi.Timer(at_load.device))
    assert np.array_equal(first, expected) and np.array_equal(second, expected)


def test_default_path_needs_only_the_script(tiny_pipeline_dir, tmp_path):
    """bf16, one device, a diffusers directory: optimized_inference.py alone, without its sibling modules, runs."""
    shutil.copy(os.path.join(REPO_ROOT, "optimized_inference.py"), tmp_path)
    out = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "optimized_inference.py", *cli_args(tiny_pipeline_dir, str(out))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert read_png(out).std() > 10 and sorted(os.listdir(tmp_path)) == ["optimized_inference.py", "out.png"]


def test_nan_latents_are_an_error(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    def nan_forward(self, img, *args, **kwargs):
        return torch.full_like(img, float("nan"))

    monkeypatch.setattr(oi.Flux, "forward", nan_forward)
    check_bad_input(oi.main, cli_args(tiny_pipeline_dir, str(tmp_path / "nan.png")), ["NaN"], tmp_path, capsys)


# ----------------------------------------------------------------------------------------------------------------------
# The index of optimizations, its flags, the README
# ----------------------------------------------------------------------------------------------------------------------
def optimizations_table() -> str:
    """The README's table of optimizations, from Options."""
    rows = ["| flag | what | why |", "| --- | --- | --- |"]
    for f in oi.OPTIMIZATIONS:
        flag = "--attention" if f.name == "attention" else f"--no-{f.name.replace('_', '-')}"
        rows.append(f"| `{flag}` | {f.metadata['what']} | {f.metadata['why']} |")
    return "\n".join(rows)


def test_readme_table_is_the_index():
    """README.md carries the table of Options as it is (to print it: python3 -m tests.test_optimized)."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        assert optimizations_table() in f.read(), "README's table of optimizations differs from Options"


@pytest.mark.parametrize("name", [f.name for f in oi.OPTIMIZATIONS if f.default is True])
def test_no_flag_reaches_the_loaded_pipeline(name, tiny_pipeline_dir, tmp_path, monkeypatch):
    """main() builds its Options with exactly that optimization off."""
    handed = []

    def stop(opts, device):
        handed.append(opts)
        raise oi.UserError("stop here")

    monkeypatch.setattr(oi, "effective_options", stop)
    flag = f"--no-{name.replace('_', '-')}"
    assert oi.main(cli_args(tiny_pipeline_dir, str(tmp_path / "x.png"), flag)) == 2
    assert oi.main(cli_args(tiny_pipeline_dir, str(tmp_path / "x.png"))) == 2
    off, default = handed
    assert dataclasses.replace(off, **{name: True}) == default and getattr(off, name) is False


def test_help_says_what_each_flag_does():
    text = " ".join(oi.build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    for f in oi.OPTIMIZATIONS:
        if f.name != "attention":
            assert f"--no-{f.name.replace('_', '-')} turn off: {' '.join(f.metadata['what'].split())}" in text
    assert "(default: 28 for dev, 4 for schnell)" in text and "(default: outputs)" in text
    assert "--attention {auto,cudnn,flash,sdpa,fa2,fa3,cudnn-fp8} the attention kernel" in text
    assert "(default: auto)" in text


def test_attention_per_architecture(monkeypatch, capsys):
    """auto: cuDNN before FlashAttention-2 on Hopper, even with flash-attn installed; FlashAttention-2 first on
    other GPUs when installed; SDPA on the CPU, and a CUDA-only kernel there is an error."""
    def fa2(q, k, v):
        return q

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fa2))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    cuda = torch.device("cuda")
    for capability, expected in [((9, 0), "cudnn"), ((8, 0), "fa2"), ((8, 9), "fa2")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert oi.resolve_attention("auto", cuda) == expected, capability
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert oi.resolve_attention("auto", cuda) == "cudnn"
    with pytest.raises(oi.UserError, match="--attention fa2 is not available"):
        oi.resolve_attention("fa2", cuda)
    opts = oi.effective_options(oi.Options(), torch.device("cpu"))
    assert (opts.attention, opts.compile, opts.cuda_graphs) == ("sdpa", False, False)
    assert "note: no CUDA device" in capsys.readouterr().out
    for backend in ("cudnn", "flash", "fa2", "fa3"):
        with pytest.raises(oi.UserError, match=backend):
            oi.effective_options(oi.Options(attention=backend), torch.device("cpu"))


if __name__ == "__main__":
    print(optimizations_table())
