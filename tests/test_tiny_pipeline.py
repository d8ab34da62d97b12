"""The offline tiny FLUX pipeline must be deterministic, loadable and produce real images."""

import os

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from tiny_pipeline import make_clip_tokenizer, make_t5_tokenizer, make_tiny_pipeline

PROMPT = "A photo of a Cat sitting on a red chair, 4k!"


def _generate(pipe, prompt=PROMPT, guidance_scale=3.5):
    return pipe(
        prompt=prompt,
        height=40,
        width=56,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        max_sequence_length=48,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images


def _read_tree(root):
    """{relative path: bytes} of every file under root."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_t5_tokenizer_is_deterministic_and_t5_like(tmp_path):
    tok_a = make_t5_tokenizer(str(tmp_path / "a"))
    tok_b = make_t5_tokenizer(str(tmp_path / "b"))
    assert (tmp_path / "a" / "spiece.model").read_bytes() == (tmp_path / "b" / "spiece.model").read_bytes()

    assert 500 <= len(tok_a) <= 1000
    assert (tok_a.pad_token_id, tok_a.eos_token_id, tok_a.unk_token_id) == (0, 1, 2)
    assert tok_a.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]

    ids = tok_a(PROMPT).input_ids
    assert ids == tok_b(PROMPT).input_ids
    assert ids[-1] == tok_a.eos_token_id
    assert all(0 <= i < len(tok_a) for i in ids)
    # The corpus covers ordinary prompt text, so it must not degrade to <unk>.
    assert tok_a.unk_token_id not in ids

    padded = tok_a(PROMPT, padding="max_length", max_length=48, truncation=True).input_ids
    assert len(padded) == 48 and padded[-1] == tok_a.pad_token_id


def test_clip_tokenizer_is_deterministic_and_clip_like(tmp_path):
    tok_a = make_clip_tokenizer(str(tmp_path / "a"))
    tok_b = make_clip_tokenizer(str(tmp_path / "b"))
    assert _read_tree(tmp_path / "a") == _read_tree(tmp_path / "b")

    assert tok_a.model_max_length == 77
    assert tok_a.pad_token == tok_a.eos_token == "<|endoftext|>"
    # As in CLIP, <|endoftext|> has the highest id, so argmax pooling finds the end token.
    assert tok_a.eos_token_id == len(tok_a) - 1

    ids = tok_a(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == tok_b(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok_a.bos_token_id and ids[-1] == tok_a.eos_token_id
    assert all(0 <= i < len(tok_a) for i in ids)
    # The built-in merges are applied: whole words become single end-of-word tokens.
    assert "photo</w>" in tok_a.convert_ids_to_tokens(ids)


def test_build_is_deterministic(tmp_path):
    make_tiny_pipeline(str(tmp_path / "a"), seed=1)
    make_tiny_pipeline(str(tmp_path / "b"), seed=1)
    make_tiny_pipeline(str(tmp_path / "c"), seed=2)
    tree_a, tree_b, tree_c = (_read_tree(tmp_path / name) for name in "abc")
    assert tree_a == tree_b
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert tree_a[weights] != tree_c[weights]


def test_pipeline_config_matches_flux(pipe):
    # Three VAE resolution levels: scale factor 4, so height/width need multiples of 8.
    assert pipe.vae_scale_factor == 4
    assert pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
    scheduler = pipe.scheduler.config
    # Older diffusers have no time_shift_type: their only time shift is the exponential one.
    assert scheduler.use_dynamic_shifting and scheduler.get("time_shift_type", "exponential") == "exponential"
    assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)


def test_pipeline_generates_finite_nonconstant_image(pipe):
    image = _generate(pipe)
    assert image.shape == (1, 40, 56, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05
    # Same seed, same image; the text and the guidance scale both reach the output.
    np.testing.assert_array_equal(image, _generate(pipe))
    assert not np.allclose(image, _generate(pipe, prompt="a dog in the snow"))
    assert not np.allclose(image, _generate(pipe, guidance_scale=1.0))


def test_schnell_variant_generates_image(tiny_pipeline_dir_schnell):
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir_schnell)
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.transformer.config.guidance_embeds
    image = _generate(pipe, guidance_scale=0.0)
    assert image.shape == (1, 40, 56, 3)
    assert np.isfinite(image).all() and image.std() > 0.05
