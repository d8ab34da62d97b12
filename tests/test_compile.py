"""The compiled step traces as one graph and computes what the eager step computes (inductor's CPU backend).

On the GPU the step is compiled with fullgraph=True: a graph break would be an error there. Compiling the tiny model
on the CPU catches that here, without a GPU, and checks inductor's fused code against eager. Dynamic shapes over three
sizes, with the graphs saved for the next process: tests/test_precompile.py.
"""

import copy
import dataclasses
import functools
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import fp8
import optimized_inference as opt


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    opts = opt.effective_options(opt.Options(text_buckets=False), torch.device("cpu"))
    return opt.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts)


def step_inputs(model, seed=0):
    torch.manual_seed(seed)
    b, h, w, text_len = 2, 8, 12, 16
    x = torch.randn(b, (h // 2) * (w // 2), 16)
    cond = model.condition(torch.randn(b, text_len, 32), torch.zeros(text_len, 3), opt.image_ids(h, w, "cpu"),
                           torch.rand(b), torch.full((b,), 3.5), torch.randn(b, 32))
    return x, torch.tensor(-0.08), cond


@torch.no_grad()
def test_whole_step_traces_as_one_graph(tiny):
    """--no-regional-compile compiles the whole Euler step with fullgraph=True: it must trace without a graph break.
    AOT tracing without code generation (inductor's kernels are checked per block, below) keeps this fast."""
    x, dt, cond = step_inputs(tiny.transformer)
    eager = opt.euler_step(tiny.transformer, x, dt, cond)
    step = torch.compile(functools.partial(opt.euler_step, tiny.transformer), fullgraph=True, dynamic=False,
                         backend="aot_eager")
    assert ((step(x, dt, cond) - eager).norm() / (eager - x).norm()).item() < 1e-6


@torch.no_grad()
def test_compiled_fp8_blocks_match_eager(tiny):
    """fp8: inductor's fused kernels quantize float32 activations where eager first rounds them to bf16, so some
    elements land on the neighbouring e4m3 value (each moves by up to 1/8). The bound is a share of fp8's own error
    (the quantized step against the unquantized one): measured 1.93-1.99e-2 against 3.6e-2, a ratio of 0.55. A wrong
    scale or layout would be off by order 1, several times fp8's error."""
    model = fp8.quantize_fp8_(fp8.bf16_twin(tiny.transformer))
    x, dt, cond = step_inputs(model)
    eager = opt.euler_step(model, x, dt, cond)
    opt.compile_blocks(model, opt.compile_options(opt.Options(quantize="fp8")))
    compiled = opt.euler_step(model, x, dt, cond)
    update = (eager - x).norm()  # errors relative to the update, not to x
    unquantized = opt.euler_step(tiny.transformer, x, dt, cond)
    fp8_error = ((eager - unquantized).norm() / update).item()
    assert ((compiled - eager).norm() / update).item() < 0.75 * fp8_error
    assert ((compiled - unquantized).norm() / update).item() < 1.25 * fp8_error


@torch.no_grad()
def test_regional_compile_shares_one_graph_per_block_kind(tiny):
    """compile_blocks: two double and two single blocks compile into two graphs, and the step still matches eager."""
    model = copy.deepcopy(tiny.transformer)
    x, dt, cond = step_inputs(model, seed=1)
    eager = opt.euler_step(model, x, dt, cond)
    torch._dynamo.reset()
    counters["stats"].clear()
    opt.compile_blocks(model)
    compiled = opt.euler_step(model, x, dt, cond)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert ((compiled - eager).norm() / (eager - x).norm()).item() < 1e-4
    counters["stats"].clear()
    opt.euler_step(model, *step_inputs(model, seed=2)[:1], dt, cond)  # same shapes, new values: no recompile
    assert counters["stats"]["unique_graphs"] == 0


def test_compile_options_per_mode(tiny):
    """The transformer's inductor options: none by default, fp8 included (split reductions measured as fast as
    unsplit once the fused kernels quantize the rows, and faster with 8-bit attention: run 38); the evidence line
    names what the blocks were compiled with."""
    assert opt.compile_options(opt.Options()) == {} and opt.compile_options(opt.Options(quantize="fp8")) == {}
    assert "compile=off," in opt.describe(tiny)
    model = copy.deepcopy(tiny.transformer)
    opt.compile_blocks(model, {"coordinate_descent_tuning": True})
    assert "compile=4 blocks (coordinate_descent_tuning=True)," in opt.describe(
        dataclasses.replace(tiny, transformer=model))


def test_vae_upsampler_warning_is_silenced(recwarn):
    """The one dynamo warning diffusers' bf16 upsampler raises on every compile: seen without the filter, not with it
    (the same compile, twice, with dynamo's warn-once memory cleared in between)."""
    from diffusers.models.upsampling import Upsample2D

    up = Upsample2D(4, use_conv=True).to(torch.bfloat16)
    x = torch.randn(1, 4, 6, 6, dtype=torch.bfloat16)

    def lru_warnings(quiet: bool) -> list[str]:
        torch._dynamo.reset()
        torch._dynamo.utils.warn_once_cache.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                opt.quiet_compile_warnings()
            torch.compile(up, backend="eager")(x)
        return [str(w.message) for w in caught if "lru_cache" in str(w.message)]

    assert any("upsampling.py" in m for m in lru_warnings(quiet=False))
    assert lru_warnings(quiet=True) == []
