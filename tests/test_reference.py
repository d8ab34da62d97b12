"""The reference implementation (single_file_inference.py) against diffusers, and its errors after a run (bad input:
tests/test_bad_input.py)."""

import os
import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

import single_file_inference as sfi
from tests.helpers import (
    GUIDANCE,
    HEIGHT,
    MAX_SEQ,
    PROMPT,
    SEED,
    STEPS,
    TINY,
    WIDTH,
    cli_args,
    max_pixel_diff,
    read_png,
    rel_err,
)

# The scheduler_config.json files of the FLUX.1 hub repos, written out here rather than taken from the script.
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# Not a FLUX.1 config, but it exercises the static-shift branch with a shift that actually bends the schedule.
STATIC_SHIFT_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def redraw_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter re-drawn: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.2), other vectors N(0, 0.1).

    No parameter keeps a default value, so a port that skipped a bias or a norm weight cannot match by accident.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def diffusers_images(model_dir: str, seeds=(SEED,), output_type: str = "np"):
    """FluxPipeline's images as uint8 [B, H, W, 3] (or its final packed latents with output_type="latent"):
    one image per seed, a CPU generator each (a single generator, not a list, for a single seed)."""
    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    images = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  max_sequence_length=MAX_SEQ, num_images_per_prompt=len(seeds),
                  generator=generators[0] if len(seeds) == 1 else generators, output_type=output_type).images
    return images if output_type == "latent" else (images * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer parity with diffusers' FluxTransformer2DModel
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_transformer_matches_diffusers(guidance_embeds):
    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    redraw_(theirs, seed=1).eval()
    cfg = sfi.config_from_checkpoint(dict(theirs.config), {})
    assert (cfg.hidden_size, cfg.guidance_embeds, cfg.axes_dims_rope) == (32, guidance_embeds, (4, 6, 6))
    with torch.device("meta"):
        ours = sfi.Flux(cfg)
    sfi.load_weights_strict(ours, theirs.state_dict(), torch.float32)
    ours.eval()

    gen = torch.Generator().manual_seed(2)
    batch, h, w, txt_len = 2, 6, 10, 7  # non-square latent grid, text length not a power of two
    x = torch.randn(batch, (h // 2) * (w // 2), 16, generator=gen)
    txt = torch.randn(batch, txt_len, 32, generator=gen)
    pooled = torch.randn(batch, 24, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 0.98 + 0.01
    guidance = torch.full((batch,), 3.5) if guidance_embeds else None
    img_ids = sfi.image_ids(h, w, "cpu")
    txt_ids = torch.zeros(txt_len, 3)
    np.testing.assert_array_equal(img_ids, FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu",
                                                                                  torch.float32))
    with torch.no_grad():
        expected = theirs(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=timestep,
                          img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        actual = ours(x, img_ids, txt, txt_ids, timestep, guidance, pooled)
    assert actual.shape == expected.shape == x.shape
    assert expected.std() > 0.1  # a real, non-degenerate output
    assert rel_err(actual, expected) < 1e-5
    # The comparison can fail: per-sample conditioning and the token positions both reach the output.
    with torch.no_grad():
        swapped = ours(x, img_ids, txt, txt_ids, timestep.flip(0), guidance, pooled)
        shuffled = ours(x, img_ids.flip(0), txt, txt_ids, timestep, guidance, pooled)
    assert rel_err(swapped, expected) > 1e-3 and rel_err(shuffled, expected) > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline parity with diffusers' FluxPipeline, through our CLI
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_cli_matches_diffusers_pipeline(variant, request, tmp_path, capsys, monkeypatch):
    model_dir = request.getfixturevalue("tiny_pipeline_dir" if variant == "dev" else "tiny_pipeline_dir_schnell")
    decoded = []  # the latents the CLI hands to the VAE: compared far more tightly than 8-bit pixels
    real_decode = sfi.decode

    def recording_decode(vae, latents):
        decoded.append(latents.clone())
        return real_decode(vae, latents)

    monkeypatch.setattr(sfi, "decode", recording_decode)
    out = tmp_path / "ref.png"
    assert sfi.main(cli_args(model_dir, str(out))) == 0
    stdout = capsys.readouterr().out

    ours = read_png(out)
    theirs = diffusers_images(model_dir)[0]
    assert ours.shape == (HEIGHT, WIDTH, 3)
    assert ours.std() > 10  # a real image, not a constant
    assert max_pixel_diff(ours, theirs) <= 2

    (latents,) = decoded
    their_latents = diffusers_images(model_dir, output_type="latent")  # packed [B, L_img, C*4]
    assert latents.shape == (1, 4, HEIGHT // 4, WIDTH // 4)
    assert rel_err(sfi.pack(latents), their_latents) < 1e-5

    with Image.open(out) as im:
        meta = dict(im.text)
    assert meta["prompt"] == PROMPT
    assert meta["seed"] == str(SEED)
    assert meta["steps"] == str(STEPS)
    assert float(meta["guidance"]) == GUIDANCE
    assert meta["size"] == f"{WIDTH}x{HEIGHT}"
    assert meta["model"] == model_dir

    for component in ("text_encoders", "denoiser", "vae"):
        assert re.search(rf"^{component} time: \d+\.\d{{3}}s$", stdout, re.MULTILINE), stdout


def test_cli_matches_diffusers_pipeline_in_bfloat16(tiny_pipeline_dir, tmp_path):
    """The default dtype: the reference rounds as diffusers does, so bf16 images agree too."""
    out = tmp_path / "bf16.png"
    args = cli_args(tiny_pipeline_dir, str(out))
    args[args.index("--dtype") + 1] = "bfloat16"
    assert sfi.main(args) == 0
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 max_sequence_length=MAX_SEQ, generator=torch.Generator("cpu").manual_seed(SEED),
                 output_type="np").images[0]
    ours = read_png(out)
    assert ours.std() > 10
    assert max_pixel_diff(ours, (image * 255).round().astype(np.uint8)) <= 2


@pytest.mark.parametrize("variant,steps,guidance", [("dev", 28, 3.5), ("schnell", 4, 0.0)])
def test_cli_defaults_come_from_the_model(variant, steps, guidance, request, tmp_path):
    model_dir = request.getfixturevalue("tiny_pipeline_dir" if variant == "dev" else "tiny_pipeline_dir_schnell")
    out = tmp_path / "defaults.png"
    assert sfi.main(["--prompt", PROMPT, "--model", model_dir, "--device", "cpu", "--dtype", "float32",
                     "--height", "16", "--width", "24", "--output", str(out)]) == 0
    with Image.open(out) as im:
        assert (im.text["steps"], float(im.text["guidance"]), im.text["size"]) == (str(steps), guidance, "24x16")


def test_cli_batch_matches_diffusers_with_one_generator_per_seed(tiny_pipeline_dir, tmp_path):
    """--batch-size 2 draws image i with seed --seed + i: each image is the one its seed gives alone."""
    out = tmp_path / "batch.png"
    assert sfi.main(cli_args(tiny_pipeline_dir, str(out), "--batch-size", "2")) == 0
    assert sorted(os.listdir(tmp_path)) == ["batch-0.png", "batch-1.png"]
    ours = [read_png(tmp_path / f"batch-{i}.png") for i in range(2)]
    theirs = diffusers_images(tiny_pipeline_dir, seeds=(SEED, SEED + 1))
    for i in range(2):
        assert max_pixel_diff(ours[i], theirs[i]) <= 2
        with Image.open(tmp_path / f"batch-{i}.png") as im:
            assert im.text["seed"] == str(SEED + i)
    assert max_pixel_diff(ours[0], diffusers_images(tiny_pipeline_dir)[0]) <= 2  # = the image of --seed alone
    assert max_pixel_diff(ours[0], ours[1]) > 20  # each image of the batch gets its own noise


# ----------------------------------------------------------------------------------------------------------------------
# Sampler pieces against diffusers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler_config", [DEV_SCHEDULER, SCHNELL_SCHEDULER, STATIC_SHIFT_SCHEDULER],
                         ids=["dev", "schnell", "static-shift"])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("height,width", [(256, 256), (512, 768), (1024, 1024), (1360, 768)])
def test_sigmas_match_diffusers_scheduler(scheduler_config, steps, height, width):
    image_seq_len = (height // 16) * (width // 16)  # FLUX: 8x VAE, then 2x2 patches
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)

    ours = sfi.flow_match_sigmas(steps, image_seq_len, dict(scheduler_config))
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_sigmas_shift_depends_on_resolution_with_dynamic_shifting():
    small, large = (sfi.flow_match_sigmas(28, n, DEV_SCHEDULER) for n in (256, 4096))
    assert (large[1:-1] > small[1:-1] + 1e-3).all()  # larger images spend more steps at high noise


@pytest.mark.parametrize("seeds", [[0], [7, 8], [1234, 5, 99]])
def test_initial_noise_matches_diffusers_randn_tensor(seeds):
    shape = (len(seeds), 4, 10, 14)
    for dtype in (torch.float32, torch.bfloat16):
        ours = sfi.initial_noise(seeds, 4, 10, 14, dtype)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        theirs = randn_tensor(shape, generator=generators if len(seeds) > 1 else generators[0],
                              device=torch.device("cpu"), dtype=dtype)
        assert ours.dtype == dtype and ours.shape == shape
        assert torch.equal(ours, theirs)
        for i, seed in enumerate(seeds):  # each image's noise is that of its seed alone
            assert torch.equal(ours[i:i + 1], sfi.initial_noise([seed], 4, 10, 14, dtype))
    assert not torch.equal(sfi.initial_noise([seeds[0] + 1], 4, 10, 14, torch.float32),
                           sfi.initial_noise([seeds[0]], 4, 10, 14, torch.float32))


def test_latent_grid_noise_and_ids_match_flux_pipeline_prepare_latents():
    """Our noise, packed, on our latent grid, is exactly what FluxPipeline.prepare_latents returns."""

    class FakePipe:  # prepare_latents only reads these off the pipeline
        vae_scale_factor = 4
        _pack_latents = staticmethod(FluxPipeline._pack_latents)
        _prepare_latent_image_ids = staticmethod(FluxPipeline._prepare_latent_image_ids)

    height, width, seeds = 40, 56, [SEED, SEED + 1]
    latents, ids = FluxPipeline.prepare_latents(FakePipe(), len(seeds), 4, height, width, torch.float32,
                                                torch.device("cpu"),
                                                [torch.Generator("cpu").manual_seed(s) for s in seeds])
    h, w = sfi.latent_grid(height, width, 4)
    assert (h, w) == (10, 14)
    assert torch.equal(sfi.pack(sfi.initial_noise(seeds, 4, h, w, torch.float32)), latents)
    assert torch.equal(sfi.image_ids(h, w, "cpu"), ids)


@pytest.mark.parametrize("batch,channels,h,w", [(1, 4, 2, 2), (2, 4, 6, 10), (3, 16, 12, 8)])
def test_pack_unpack_match_diffusers(batch, channels, h, w):
    latents = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(3))
    packed = sfi.pack(latents)
    assert packed.shape == (batch, (h // 2) * (w // 2), channels * 4)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, batch, channels, h, w))
    assert torch.equal(sfi.unpack(packed, h, w), latents)
    # _unpack_latents takes the image size: latent size times the VAE scale factor (8 for FLUX.1).
    assert torch.equal(sfi.unpack(packed, h, w), FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8))
    assert torch.equal(sfi.image_ids(h, w, "cpu"),
                       FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32))


# ----------------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------------
TINY_CFG = sfi.FluxConfig(**TINY)


def tiny_state_dict() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = sfi.Flux(TINY_CFG)
    return dict(sfi.init_random_(model.to_empty(device="cpu")).state_dict())


def load_into_meta(state):
    with torch.device("meta"):
        model = sfi.Flux(TINY_CFG)
    sfi.load_weights_strict(model, state, torch.float32)
    return model


def test_strict_loading_accepts_exact_state_dict():
    state = tiny_state_dict()
    model = load_into_meta(dict(state))
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, state[key]), key


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape", "renamed"])
def test_strict_loading_names_the_offending_key(problem):
    state = tiny_state_dict()
    key = "single_transformer_blocks.1.attn.to_k.weight"
    if problem == "missing":
        del state[key]
        names = [key]
    elif problem == "unexpected":
        state["transformer_blocks.0.attn.to_qkv.weight"] = torch.randn(96, 32)
        names = ["transformer_blocks.0.attn.to_qkv.weight"]
    elif problem == "shape":
        state[key] = torch.randn(32, 31)
        names = [key]
    else:
        state["single_transformer_blocks.1.attn.to_key.weight"] = state.pop(key)
        names = [key, "single_transformer_blocks.1.attn.to_key.weight"]
    with pytest.raises(sfi.UserError) as excinfo:
        load_into_meta(state)
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    if problem == "shape":
        assert "(32, 31)" in message and "(32, 32)" in message


# ----------------------------------------------------------------------------------------------------------------------
# Errors after the run: one line on stderr, a non-zero exit status, no output file (bad input: tests/test_bad_input.py)
# ----------------------------------------------------------------------------------------------------------------------
def test_failed_save_is_an_error_and_leaves_no_file(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """A write that fails after the whole run (disk full, say): one error line, and no half-written file."""
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".png"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    out = tmp_path / "full.png"
    assert sfi.main(cli_args(tiny_pipeline_dir, str(out))) != 0
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err_lines[-1].startswith("error:") and "No space left on device" in err_lines[-1]
    assert sum(line.startswith("error:") for line in err_lines) == 1
    assert os.listdir(tmp_path) == []


def test_save_with_a_directory_in_the_way_of_the_temp_file(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    (tmp_path / "out.png.tmp").mkdir()
    assert sfi.main(cli_args(tiny_pipeline_dir, str(out))) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    assert not out.exists()


def test_nan_latents_are_an_error(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    def nan_forward(self, img, *args):
        return torch.full_like(img, float("nan"))

    monkeypatch.setattr(sfi.Flux, "forward", nan_forward)
    out = tmp_path / "nan.png"
    assert sfi.main(cli_args(tiny_pipeline_dir, str(out))) != 0
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "NaN" in err_lines[0]
    assert os.listdir(tmp_path) == []
