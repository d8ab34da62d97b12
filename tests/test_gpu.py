"""GPU checks at full FLUX.1-dev size (random weights, bf16): the optimized path against the reference.

Run on a CUDA machine: `python3 -m pytest -q -rA -m cuda tests/test_gpu.py` (gpu_checks.sh does). Building both
models and compiling the optimized blocks takes a few minutes; the fixtures are module-scoped so that happens once.

The weights are undamped, as in the CPU tests: every adaLN projection at full strength (init_random_ damps them by 10
for --random-weights, which makes a velocity barely depend on the timestep or the positions, so that a wrong model
could pass). Each comparison carries negative controls, run in the same test: a deliberately wrong input (reversed
image positions, another timestep) must move the reference's own output by CONTROL_FACTOR times the bound or more.
"""

import copy
import dataclasses

import pytest
import torch

import optimized_inference as opt
import single_file_inference as ref
from tests.helpers import psnr, rel_err

pytestmark = pytest.mark.cuda

HEIGHT = WIDTH = 1024
TEXT_LEN = 512
# bf16 against bf16, one velocity: two implementations that round differently (compiled kernels, bf16 RoPE tables,
# other summation orders). The bound must sit far below what a wrong model does (CONTROL_FACTOR).
VELOCITY_BOUND = 3e-2
CONTROL_FACTOR = 3


@torch.no_grad()
def undamp_(model: ref.Flux, seed: int = 4) -> ref.Flux:
    """Undo init_random_'s damping of the adaLN projections and give the q/k norms weights other than 1."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for module in model.modules():
        if isinstance(module, ref.AdaNorm):
            module.linear.weight.mul_(10)
        elif isinstance(module, ref.QKNorm):
            module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen, device="cuda"))
    return model


@pytest.fixture(scope="module")
def pipes():
    """The reference pipeline, and optimized pipelines (compiled + graphed, and eager) over the same weights."""
    reference = ref.load_pipeline("black-forest-labs/FLUX.1-dev", "cuda", torch.bfloat16, random_weights=True)
    undamp_(reference.transformer)
    cfg = opt.FluxConfig(**{f.name: getattr(reference.cfg, f.name) for f in dataclasses.fields(reference.cfg)})
    # Text buckets off: both sides must see the same 512 T5 tokens.
    opts = opt.effective_options(opt.Options(text_buckets=False), torch.device("cuda"))
    with torch.device("meta"):
        model = opt.Flux(cfg, opts)
    state = opt.prepare_state({k: v.clone() for k, v in reference.transformer.state_dict().items()}, cfg, opts)
    opt.load_weights_strict(model, state, torch.bfloat16)
    model.eval().requires_grad_(False)
    vae = copy.deepcopy(reference.vae)
    opt.optimize(model, opts)
    opt.optimize_vae(vae, opts)
    parts = (cfg, model, reference.clip, reference.t5, reference.clip_tokenizer, reference.t5_tokenizer)
    fast = opt.Pipeline(*parts, vae, "random", reference.device, torch.bfloat16, opts)
    eager_opts = dataclasses.replace(opts, compile=False, cuda_graphs=False)
    eager = opt.Pipeline(*parts, reference.vae, "random", reference.device, torch.bfloat16, eager_opts)
    return reference, fast, eager


def request(prompt: str, seed: int, steps: int) -> ref.Request:
    return ref.Request([prompt], [prompt], HEIGHT, WIDTH, steps, 3.5, [seed], TEXT_LEN)


@torch.no_grad()
def test_graphed_velocity_matches_reference(pipes, record_property):
    """One step through the compiled CUDA graph vs the eager float32-RoPE reference, same inputs, in bf16."""
    reference, fast, _ = pipes
    txt, pooled = ref.encode_prompt(reference, ["a lighthouse at dusk"], ["a lighthouse at dusk"], TEXT_LEN)
    h, w = ref.latent_grid(HEIGHT, WIDTH, reference.vae_scale_factor)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = ref.pack(torch.randn(1, 16, h, w, device="cuda", dtype=torch.bfloat16, generator=gen))
    img_ids, txt_ids = ref.image_ids(h, w, "cuda"), torch.zeros(TEXT_LEN, 3, device="cuda")
    t, g = torch.full((1,), 0.7, device="cuda").bfloat16(), torch.full((1,), 3.5, device="cuda")
    v_ref = reference.transformer(x, img_ids, txt, txt_ids, t, g, pooled)
    cond = fast.transformer.condition(txt, txt_ids, img_ids, t, g, pooled)
    # With dt = 1 the Euler step returns x + v, so the velocity is read back to within bf16 rounding of x + v.
    one = torch.ones((), device="cuda")
    step = opt.step_function(fast, x, one, cond)
    assert isinstance(step, opt.CUDAGraphStep)
    v_fast = step(x, one, cond).float() - x.float()
    controls = {
        "reversed image positions": reference.transformer(x, img_ids.flip(0), txt, txt_ids, t, g, pooled),
        "timestep 0.6 instead of 0.7": reference.transformer(x, img_ids, txt, txt_ids, t - 0.1, g, pooled),
    }
    errors = {"optimized": rel_err(v_fast, v_ref), **{k: rel_err(v, v_ref) for k, v in controls.items()}}
    print(f"\nvelocity relative error against the reference: {errors}")
    record_property("velocity_errors", errors)
    assert torch.isfinite(v_ref).all() and v_ref.float().std() > 0.1
    assert errors["optimized"] < VELOCITY_BOUND
    for name in controls:
        assert errors[name] > CONTROL_FACTOR * VELOCITY_BOUND, name


@torch.no_grad()
def test_images_match_reference(pipes, record_property):
    """28 steps and the decoder: the optimized image against the reference's, and a control that differs only in
    its guidance (3.0 instead of 3.5)."""
    reference, fast, _ = pipes
    req = request("a red fox in the snow, photograph", seed=3, steps=28)
    image_ref = ref.generate(reference, req, ref.Timer(reference.device))[0]
    image_fast = opt.generate(fast, req, opt.Timer(fast.device))[0]
    image_control = ref.generate(reference, dataclasses.replace(req, guidance=3.0), ref.Timer(reference.device))[0]
    scores = {"optimized": psnr(image_fast, image_ref), "guidance 3.0": psnr(image_control, image_ref)}
    print(f"\nPSNR against the reference image, dB: {scores}")
    record_property("image_psnr", scores)
    assert image_ref.std() > 5  # not a flat image
    assert scores["optimized"] > 30
    assert scores["guidance 3.0"] < scores["optimized"] - 10  # 10 dB: a tenth of the squared error


@torch.no_grad()
def test_graph_replay_serves_a_new_request(pipes, record_property):
    """The captured graph, reused for another prompt and seed, gives what the eager optimized model gives; the same
    request one step shorter is the control."""
    _, fast, eager = pipes
    req = request("an old map of an island with a compass rose", seed=11, steps=6)
    latents = {}
    for name, pipe, steps in (("fast", fast, 6), ("eager", eager, 6), ("eager, 5 steps", eager, 5)):
        # The pipelines share the model, whose blocks are compiled: the eager one runs them uncompiled.
        with torch.compiler.set_stance("force_eager" if pipe is eager else "default"):
            latents[name] = denoise_latents(pipe, dataclasses.replace(req, steps=steps))
    errors = {k: rel_err(v, latents["eager"]) for k, v in latents.items() if k != "eager"}
    print(f"\nlatents relative error against eager: {errors}")
    record_property("replay_errors", errors)
    assert sum(isinstance(s, opt.CUDAGraphStep) for s in fast.steps.values()) == 1, "one graph for the shape"
    assert errors["fast"] < VELOCITY_BOUND
    assert errors["eager, 5 steps"] > CONTROL_FACTOR * VELOCITY_BOUND


def test_evidence_read_off_the_pipeline(pipes):
    """After the requests above: every optimization shows in the objects, not only in the flags."""
    _, fast, _ = pipes
    seen = dict(part.split("=", 1) for part in opt.describe(fast).removeprefix("optimizations: ").split(", "))
    cfg = fast.cfg
    assert seen["fused projections"] == str(2 * cfg.num_layers + cfg.num_single_layers)
    assert seen["rope"] == "bfloat16" and seen["conditioning"] == "once per request" and seen["T5 tokens"] == "512"
    assert seen["compile"] == f"{cfg.num_layers + cfg.num_single_layers} blocks" and seen["vae compiled"] == str(
        fast.opts.compile_vae)  # opt-in since run 25
    assert int(seen["cuda graphs"]) >= 1 and seen["channels-last vae"] == "True" and seen["uint8 on"] == "cuda"
    assert seen["attention"] == opt.resolve_attention("auto", torch.device("cuda"))


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
    assert rel_err(opt.attention(q, k.flip(1), v, backend), expected) > 0.1  # control: keys in another order
