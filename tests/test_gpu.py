"""GPU checks at full FLUX.1-dev size (random weights, bf16): the optimized path against the reference.

Run on a CUDA machine: `python3 -m pytest -q -m cuda tests/test_gpu.py`. Building both models and compiling the
optimized step takes a few minutes; the fixtures are module-scoped so that happens once.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import optimized_inference as opt
import single_file_inference as ref

pytestmark = pytest.mark.cuda

HEIGHT = WIDTH = 1024
TEXT_LEN = 512


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def pipes():
    """The reference pipeline, and optimized pipelines (compiled + graphed, and eager) over the same weights."""
    reference = ref.load_pipeline("black-forest-labs/FLUX.1-dev", "cuda", torch.bfloat16, random_weights=True)
    cfg = opt.FluxConfig(**{f.name: getattr(reference.cfg, f.name) for f in dataclasses.fields(reference.cfg)})
    # Text buckets off: both sides must see the same 512 T5 tokens.
    opts = opt.effective_options(opt.Options(text_buckets=False), torch.device("cuda"))
    with torch.device("meta"):
        model = opt.Flux(cfg, opts)
    opt.load_weights_strict(model, opt.prepare_state(dict(reference.transformer.state_dict()), cfg, opts),
                            torch.bfloat16)
    model.eval().requires_grad_(False)
    vae = copy.deepcopy(reference.vae).to(memory_format=torch.channels_last)
    opt.compile_at_load(model, vae, opts)
    parts = (cfg, model, reference.clip, reference.t5, reference.clip_tokenizer, reference.t5_tokenizer)
    fast = opt.Pipeline(*parts, vae, "random", reference.device, torch.bfloat16, opts)
    eager_opts = dataclasses.replace(opts, compile=False, cuda_graphs=False)
    eager = opt.Pipeline(*parts, reference.vae, "random", reference.device, torch.bfloat16, eager_opts)
    return reference, fast, eager


def request(prompt: str, seed: int, steps: int) -> ref.Request:
    return ref.Request([prompt], [prompt], HEIGHT, WIDTH, steps, 3.5, [seed], TEXT_LEN)


def test_describe_reports_every_optimization(pipes):
    _, fast, _ = pipes
    line = opt.describe(fast)
    n_fused = 2 * fast.cfg.num_layers + fast.cfg.num_single_layers
    assert f"fused projections={n_fused}" in line and "rope=bfloat16" in line
    assert f"compile={fast.cfg.num_layers + fast.cfg.num_single_layers} blocks" in line
    assert "cuda-graphs=True" in line and "channels-last-vae=True" in line
    assert "attention=" in line and "attention=sdpa" not in line  # a named kernel, not SDPA's own choice


@torch.no_grad()
def test_graphed_velocity_matches_reference(pipes):
    """One step through the compiled CUDA graph vs the eager float32-RoPE reference, same inputs, in bf16."""
    reference, fast, _ = pipes
    torch.manual_seed(1)
    txt, pooled = ref.encode_prompt(reference, ["a lighthouse at dusk"], ["a lighthouse at dusk"], TEXT_LEN)
    h, w = ref.latent_grid(HEIGHT, WIDTH, reference.vae_scale_factor)
    x = ref.pack(torch.randn(1, 16, h, w, device="cuda", dtype=torch.bfloat16))
    img_ids, txt_ids = ref.image_ids(h, w, "cuda"), torch.zeros(TEXT_LEN, 3, device="cuda")
    t, g = torch.full((1,), 0.7, device="cuda").bfloat16(), torch.full((1,), 3.5, device="cuda")
    v_ref = reference.transformer(x, img_ids, txt, txt_ids, t, g, pooled)
    cond = fast.transformer.condition(txt, txt_ids, img_ids, t, g, pooled)
    # With dt = 1 the Euler step returns x + v, so the velocity is read back to within bf16 rounding of x + v.
    one = torch.ones((), device="cuda")
    step = opt.step_function(fast, x, one, cond)
    assert isinstance(step, opt.CUDAGraphStep)
    v_fast = step(x, one, cond).float() - x.float()
    assert torch.isfinite(v_ref).all() and v_ref.float().std() > 0.1
    assert rel_err(v_fast, v_ref) < 2e-2


@torch.no_grad()
def test_images_match_reference(pipes):
    reference, fast, _ = pipes
    req = request("a red fox in the snow, photograph", seed=3, steps=28)
    image_ref = ref.generate(reference, req, ref.Timer(reference.device))[0]
    image_fast = opt.generate(fast, req, opt.Timer(fast.device))[0]
    assert image_ref.std() > 5  # not a flat image
    assert psnr(image_fast, image_ref) > 30


@torch.no_grad()
def test_graph_replay_serves_a_new_request(pipes):
    """The captured graph, reused for another prompt and seed, gives what the eager optimized model gives."""
    _, fast, eager = pipes
    req = request("an old map of an island with a compass rose", seed=11, steps=6)
    latents = {}
    for name, pipe in (("fast", fast), ("eager", eager)):
        # The pipelines share the model, whose blocks are compiled: the eager one runs them uncompiled.
        with torch.compiler.set_stance("force_eager" if name == "eager" else "default"):
            latents[name] = denoise_latents(pipe, req)
    assert len(fast.steps) == 1, "the step for this shape should have been captured once and reused"
    assert rel_err(latents["fast"], latents["eager"]) < 2e-2


def denoise_latents(pipe: opt.Pipeline, req: ref.Request) -> torch.Tensor:
    txt, pooled = opt.encode_prompt(pipe, req.prompts, req.prompts_2, req.max_sequence_length)
    h, w = opt.latent_grid(HEIGHT, WIDTH, pipe.vae_scale_factor)
    sigmas = opt.flow_match_sigmas(req.steps, (h // 2) * (w // 2), pipe.cfg.scheduler)
    noise = opt.initial_noise(req.seeds, 16, h, w, torch.bfloat16).cuda()
    return opt.denoise(pipe, noise, txt, pooled, sigmas, req.guidance)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_attention_backends_match_sdpa_math(backend):
    q, k, v = (torch.randn(1, 4608, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = opt.attention(q, k, v, backend)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = opt.attention(q.float(), k.float(), v.float(), "sdpa")
    assert out.shape == (1, 4608, 24 * 128)
    assert rel_err(out, expected) < 1e-2
