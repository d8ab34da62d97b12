"""Shared pytest setup: the ``cuda`` marker and the tiny offline FLUX pipelines."""

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

# The scripts under test (single_file_inference.py, ...) live at the repo root, not in a package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tests.forked import Forkserver  # noqa: E402
from tiny_pipeline import make_tiny_pipeline  # noqa: E402  (needs the sys.path entry above)


def pytest_collection_modifyitems(config, items):
    # CI and developer machines have no GPU; the cuda tests run on the lent device machine.
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def restore_dynamo_settings():
    """optimize() with dynamic shapes changes two global dynamo settings (dynamic_shapes_config), and saved graphs a
    third (precompile_blocks): undone after each test, so that later tests compile as they would alone."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    config = torch._dynamo.config
    saved = fx_config.use_duck_shape, config.specialize_float, config.enable_aot_compile
    yield
    fx_config.use_duck_shape, config.specialize_float, config.enable_aot_compile = saved


# What the peers' jobs (test_peers.py), the context-parallel workers (test_parallel.py) and the warm start
# (test_precompile.py) import first: the tiny pipeline's model classes (which from_pretrained and load_pipeline import)
# and inductor (which loads saved graphs).
FORKSERVER_PRELUDE = """
import json, sys, torch, torch._inductor.compile_fx
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
import benchmark, optimized_inference, peers, precompile, prompts_file, single_file_inference
from single_file_inference import Timer
"""


@pytest.fixture(scope="session")
def forkserver():
    """Runs a job in a process of its own, forked from one that has imported FORKSERVER_PRELUDE once and run nothing
    else (tests/forked.py): each job starts as a new process would after those imports, 5-8 s sooner."""
    with Forkserver(FORKSERVER_PRELUDE, cwd=REPO_ROOT) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random-weight FLUX.1-dev-like pipeline (with guidance embedding), built once."""
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_flux_dev")), guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_pipeline_dir_schnell(tmp_path_factory):
    """A tiny random-weight FLUX.1-schnell-like pipeline (no guidance embedding), built once."""
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_flux_schnell")), guidance_embeds=False)


@pytest.fixture(scope="module")
def broken_model_dirs(tiny_pipeline_dir, tmp_path_factory):
    """Copies of the tiny pipeline, each broken one way, by name: no VAE, a renamed transformer key, no transformer
    config; the transformer's weights cut in half, empty or random bytes; T5's weights cut in half; T5's tokenizer
    files random bytes."""
    root = tmp_path_factory.mktemp("broken_models")
    no_vae = shutil.copytree(tiny_pipeline_dir, root / "incomplete")  # a name that does not contain "vae"
    shutil.rmtree(no_vae / "vae")

    renamed = shutil.copytree(tiny_pipeline_dir, root / "renamed_key")
    weights = renamed / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["transformer_blocks.1.attn.to_key.weight"] = state.pop("transformer_blocks.1.attn.to_k.weight")
    save_file(state, weights)

    no_config = shutil.copytree(tiny_pipeline_dir, root / "no_transformer_config")
    os.remove(no_config / "transformer" / "config.json")
    dirs = {"no_vae": str(no_vae), "renamed_key": str(renamed), "no_transformer_config": str(no_config)}

    garbage = np.random.default_rng(0).bytes(4096)
    half = lambda data: data[: len(data) // 2]  # noqa: E731
    transformer = ["transformer/diffusion_pytorch_model.safetensors"]
    t5_tokenizer = [f"tokenizer_2/{f}" for f in os.listdir(os.path.join(tiny_pipeline_dir, "tokenizer_2"))]
    for name, files, damage in [
        ("truncated", transformer, half), ("empty", transformer, lambda data: b""),
        ("garbage", transformer, lambda data: garbage), ("truncated_t5", ["text_encoder_2/model.safetensors"], half),
        ("garbage_t5_tokenizer", t5_tokenizer, lambda data: garbage),
    ]:
        copy = shutil.copytree(tiny_pipeline_dir, root / name)
        for file in files:
            (copy / file).write_bytes(damage((copy / file).read_bytes()))
        dirs[name] = str(copy)
    return dirs
