"""--quantize fp8 (optimized_inference.py): the quantization, the float8 linear layer, which layers it replaces,
its error on a tiny model, the --compare-bf16 report and the flags' error paths.

On the CPU torch emulates float8 matmuls (torch._scaled_mm with rowwise scales), so all of it runs here. The error
bounds are those of e4m3's 3-bit mantissa: a value rounds to within 2^-4 of itself, and a matmul of two rounded
operands on random data comes out ~3.7% off (measured below). The last tests (marked cuda) check the GEMMs at
FLUX.1-dev's shapes and the full-size compiled step on a GPU, and print their speed.
"""

import functools
import importlib.util
import json
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from PIL import Image
from torch import nn
from torch._dynamo.utils import counters

import fp8
import optimized_inference as oi
from benchmark import cuda_seconds
from tests.forked import Forkserver
from tests.helpers import REPO_ROOT, TINY, rel_err

PROMPT = "A photo of a cat sitting on a red chair in the warm morning light"
CPU = oi.Options(attention="sdpa", compile=False, cuda_graphs=False)
ADALN = ("norm1.linear", "norm1_context.linear", "norm.linear")  # the blocks' adaLN projections: stay bf16


def random_linear(k: int, n: int, dtype=torch.float32, device="cpu", seed=0) -> nn.Linear:
    """Weights like a trained layer's scale (N(0, 1/k)), never zero: zeros would make any error bound trivial."""
    gen = torch.Generator(device).manual_seed(seed)
    lin = nn.Linear(k, n, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen, device=device) / math.sqrt(k))
        lin.bias.copy_(0.02 * torch.randn(n, generator=gen, device=device))
    return lin


# ----------------------------------------------------------------------------------------------------------------------
# quantize_fp8 and Float8Linear
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_round_trip_error_bound(dtype):
    gen = torch.Generator().manual_seed(0)
    # Rows and columns of very different magnitudes (as activations have), so the per-row scales matter.
    x = (torch.randn(256, 3072, generator=gen) * torch.exp(2 * torch.randn(256, 1, generator=gen))
         * torch.exp(torch.randn(1, 3072, generator=gen))).to(dtype)
    q, scale = fp8.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (256, 1)
    assert torch.equal(q.float().abs().amax(dim=-1), torch.full((256,), 448.0))  # each row uses the whole range
    x, back = x.double(), q.double() * scale.double()
    # Half a unit in the last place of a 3-bit mantissa: 2^-4 relative; below e4m3's smallest normal (2^-6, scaled)
    # the spacing is fixed at 2^-9, so half of it, 2^-10 of the scale, absolute. Measured: 0.94 of this bound.
    bound = 2**-4 * x.abs() + 2**-10 * scale.double()
    assert ((back - x).abs() <= bound).all()
    assert rel_err(back, x) < 0.03  # measured 0.026 (float32 and bf16 input)


def test_quantize_zero_row_and_overflow():
    x = torch.zeros(3, 32)
    x[1] = torch.linspace(-5, 7, 32)
    x[2] = 1e30  # far past e4m3's range before scaling
    q, scale = fp8.quantize_fp8(x)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert (q[0].float() == 0).all()
    assert (q[2].float() == 448).all() and torch.allclose(scale[2], torch.tensor([1e30 / 448]))


@pytest.mark.parametrize("k,n", [(64, 48), (3072, 9216), (12288, 3072)])
def test_float8_linear_matches_linear(k, n):
    lin = random_linear(k, n)
    x = torch.randn(2, 37, k, generator=torch.Generator().manual_seed(1))  # 3-D, tokens not a multiple of 16
    f8 = fp8.Float8Linear(lin)
    assert f8.weight.dtype == torch.float8_e4m3fn and f8.weight.shape == (n, k)
    assert f8.weight.t().stride() == (1, k)  # column-major second operand, as _scaled_mm needs it
    assert f8.scale.dtype == torch.float32 and f8.scale.shape == (1, n)
    assert f8.bias.dtype == torch.bfloat16
    out = f8(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 37, n)
    with torch.no_grad():
        expected = lin(x)
    # e4m3 against float32: measured 0.036-0.038 (both operands rounded, errors add in quadrature).
    assert rel_err(out, expected) < 5e-2
    # Against the same arithmetic written out (dequantized operands, float64): only the bf16 output rounding and
    # float32 accumulation remain (measured 1.7e-3); a wrong scale layout or transposed operand would be far off.
    qx, sx = fp8.quantize_fp8(x.bfloat16().reshape(-1, k))
    exact = (qx.double() * sx.double()) @ (f8.weight.double() * f8.scale.double().t()).t() + f8.bias.double()
    assert rel_err(out.reshape(-1, n), exact) < 4e-3
    # bf16 itself, for scale (measured 0.0029): fp8 is ~13x further from float32 than a bf16 linear layer.
    assert rel_err(lin.bfloat16()(x.bfloat16()), expected) < 5e-3


# ----------------------------------------------------------------------------------------------------------------------
# quantize_fp8_ on a tiny Flux
# ----------------------------------------------------------------------------------------------------------------------
def tiny_flux(opts=CPU, dtype=torch.bfloat16, modulation=10.0) -> oi.Flux:
    """A tiny random Flux; its adaLN modulations scaled up to order 1 (init_random_ keeps them small), so that
    every block, not only the embedder-to-projection path, shapes the velocity."""
    with torch.device("meta"):
        model = oi.Flux(oi.FluxConfig(**TINY), opts)
    model = oi.init_random_(model.to_empty(device="cpu"), seed=3)
    with torch.no_grad():
        for norm in model.ada_norms:
            norm.linear.weight.mul_(modulation)
    return model.to(dtype).eval().requires_grad_(False)


def linear_names(model: nn.Module, kind) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("fused_qkv,expected", [(True, 20), (False, 34)], ids=["fused", "unfused"])
def test_quantize_fp8_replaces_exactly_the_block_linears(fused_qkv, expected):
    model = tiny_flux(oi.Options(fused_qkv=fused_qkv, attention="sdpa", compile=False, cuda_graphs=False))
    before = linear_names(model, nn.Linear)
    intended = {n for n in before if n.startswith(("transformer_blocks.", "single_transformer_blocks."))
                and not n.endswith(ADALN)}
    # Per double block: q/k/v (fused or not) and output of both streams, and both MLPs; per single block: q/k/v and
    # the MLP input (fused or not) and the output projection.
    assert len(intended) == expected
    fp8.quantize_fp8_(model)
    assert linear_names(model, fp8.Float8Linear) == intended
    assert linear_names(model, nn.Linear) == before - intended
    stay = {"x_embedder", "context_embedder", "proj_out", "norm_out.linear"}
    assert stay <= linear_names(model, nn.Linear)  # outside the blocks: bf16
    assert sum(n.endswith(ADALN) for n in linear_names(model, nn.Linear)) == 2 * 2 + 2  # every adaLN: bf16


def test_keep_bf16_leaves_blocks_at_both_ends():
    model = fp8.quantize_fp8_(tiny_flux(), keep_bf16=1)  # 4 blocks: the first double and the last single stay
    blocks = {".".join(name.split(".")[:2]) for name in linear_names(model, fp8.Float8Linear)}
    assert blocks == {"transformer_blocks.1", "single_transformer_blocks.0"}
    assert len(linear_names(model, fp8.Float8Linear)) == 8 + 2
    assert not linear_names(fp8.quantize_fp8_(tiny_flux(), keep_bf16=2), fp8.Float8Linear)


def inputs(batch=2, h=8, w=12, txt_len=7, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, (h // 2) * (w // 2), 16, generator=gen)
    # Timesteps and guidance whose (x 1000) values bf16 represents exactly, so that bf16 and float32 models see the
    # same conditioning and differ only in arithmetic.
    cond = dict(txt=torch.randn(batch, txt_len, 32, generator=gen), txt_ids=torch.zeros(txt_len, 3),
                img_ids=oi.image_ids(h, w, "cpu"), timestep=torch.tensor([0.5, 0.25]),
                guidance=torch.full((batch,), 4.0), pooled=torch.randn(batch, 24, generator=gen))
    return x, cond


def velocity(model, x, cond, dtype=torch.bfloat16):
    with torch.no_grad():
        return oi.velocity(model, x.to(dtype), {k: v.to(dtype) if k in ("txt", "pooled") else v
                                                for k, v in cond.items()})


def test_quantized_velocity_close_to_bf16_and_float32():
    fp32 = tiny_flux(dtype=torch.float32)
    bf16 = tiny_flux()
    quantized = fp8.quantize_fp8_(fp8.bf16_twin(bf16))
    x, cond = inputs()
    v32, v16, v8 = velocity(fp32, x, cond, torch.float32), velocity(bf16, x, cond), velocity(quantized, x, cond)
    assert v8.dtype == torch.bfloat16 and v8.shape == x.shape
    # Measured: fp8 vs bf16 0.025, fp8 vs float32 0.025, bf16 vs float32 0.008 (20 fp8 layers in 4 blocks; the same
    # with --no-fp8-fused-quant).
    assert 1e-3 < rel_err(v8, v16) < 0.06
    assert rel_err(v8, v32) < 0.06
    assert rel_err(v16, v32) < 0.02
    # Sensitivity: another timestep moves the velocity ~20x further than fp8 does.
    other = velocity(bf16, x, dict(cond, timestep=torch.tensor([0.75, 0.125])))
    assert rel_err(other, v16) > 10 * rel_err(v8, v16)


def test_bf16_twin_shares_weights_and_stays_bf16():
    model = tiny_flux()
    twin = fp8.bf16_twin(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert a.data_ptr() == b.data_ptr(), name  # no copy: --compare-bf16 costs only the fp8 weights
    x, cond = inputs()
    before = velocity(twin, x, cond)
    fp8.quantize_fp8_(model)
    assert not linear_names(twin, fp8.Float8Linear)
    assert torch.equal(velocity(twin, x, cond), before)
    assert torch.equal(velocity(fp8.quantize_fp8_(fp8.bf16_twin(twin), keep_bf16=2), x, cond), before)


# ----------------------------------------------------------------------------------------------------------------------
# --fp8-fused-quant: the ops (CPU: their torch twins), the Triton kernels (Triton's interpreter), the model
# ----------------------------------------------------------------------------------------------------------------------
def bf16_randn(*shape, std=1.0, seed=0) -> torch.Tensor:
    return (std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).bfloat16()


def assert_e4m3_rows(q: torch.Tensor, s: torch.Tensor, exact: torch.Tensor) -> None:
    """(q, s) quantizes `exact` [..., width] per row: s = the row's amax / 448, q = exact / s rounded to e4m3.

    Allowed: an element within 1e-5 of an e4m3 rounding boundary going either way (a kernel's sigmoid and square root
    are not torch's to the last bit). In Triton's interpreter only with its casts made exact (exact_interpreter_casts).
    """
    q, s, exact = q.cpu().flatten(0, -2), s.cpu().flatten(0, -2), exact.cpu().double().flatten(0, -2)
    amax = exact.abs().amax(dim=-1, keepdim=True)
    zero = amax[:, 0] == 0  # a row of zeros: q 0, and the scale of amax's floor, 1e-12 (quantize_fp8's)
    assert (q[zero].float() == 0).all() and (s[zero] == torch.tensor(1e-12 / 448, dtype=torch.float32)).all()
    q, s, exact, amax = q[~zero], s[~zero], exact[~zero], amax[~zero]
    torch.testing.assert_close(s.double(), amax / 448, rtol=1e-5, atol=0)
    scaled = exact * (448 / amax)
    low, high = ((scaled * f).clamp(-448, 448).to(torch.float8_e4m3fn).double() for f in (1 - 1e-5, 1 + 1e-5))
    got = q.double()
    ok = (got == low) | (got == high)
    assert ok.all(), f"{(~ok).sum().item()} of {ok.numel()} e4m3 values differ"


def fused_quant_inputs(device="cpu", tokens=5) -> SimpleNamespace:
    """Batch 2, each sample with its own modulation (the per-sample indexing counts), 5 tokens, widths that are not
    powers of two (the masked lanes count); shift, scale and gate column slices of one wider tensor, as the blocks'
    chunks of the modulations are; the MLP input a column slice of the fused projection's output, as in the single
    blocks."""
    mods = bf16_randn(2, 3 * 48 + 8, std=0.5, seed=2)
    qkv_mlp = bf16_randn(2, tokens, 3 * 16 + 72, std=2.0, seed=5)
    i = SimpleNamespace(x=bf16_randn(2, tokens, 48, seed=1), shift=mods[:, :48], scale=mods[:, 48:96],
                        gate=mods[:, 96:144], y=bf16_randn(2, tokens, 48, seed=3),
                        a=bf16_randn(2, tokens, 40, seed=4), h=qkv_mlp[..., 48:])
    return SimpleNamespace(**{k: v.to(device) for k, v in vars(i).items()})


def exact_modulate(x, shift, scale) -> torch.Tensor:
    """modulate() in float64, without rounding."""
    return (F.layer_norm(x.double(), x.shape[-1:], eps=1e-6) * (1 + scale.double()[:, None])
            + shift.double()[:, None])


def exact_gelu(h) -> torch.Tensor:
    return F.gelu(h.double(), approximate="tanh")


def check_fused_quant(ln, gelu, device: str = "cpu") -> None:
    """ln(x, shift, scale, gate, y) -> (x + gate y or None, q, s) and gelu(a, h) -> (q, s), a or h possibly None:
    against the exact formulas (assert_e4m3_rows)."""
    i = fused_quant_inputs(device)
    x_out, q, s = ln(i.x, i.shift, i.scale, None, None)
    assert x_out is None and q.shape == i.x.shape and q.dtype == torch.float8_e4m3fn and s.shape == (2, 5, 1)
    assert_e4m3_rows(q, s, exact_modulate(i.x, i.shift, i.scale))
    x_out, q, s = ln(i.x, i.shift, i.scale, i.gate, i.y)
    residual = i.x.double() + i.gate.double()[:, None] * i.y.double()
    # The new residual stream, rounded once to bf16 (to nearest: within half of bf16's 2^-7 relative step)
    assert x_out.dtype == torch.bfloat16 and ((x_out.double() - residual).abs() <= 2**-8 * residual.abs()).all()
    assert_e4m3_rows(q, s, exact_modulate(x_out, i.shift, i.scale))
    for a, h, exact in ((i.a, i.h, torch.cat([i.a.double(), exact_gelu(i.h)], dim=-1)), (None, i.h, exact_gelu(i.h)),
                        (i.a, None, i.a.double())):
        q, s = gelu(a, h)
        assert q.shape == exact.shape and s.shape == (2, 5, 1)
        assert_e4m3_rows(q, s, exact)
    # Whatever strides a compiled graph hands over (here: the width strided, tokens of unit stride), and a modulation
    # of batch 1 broadcast over the batch (as scale[:, None] is): the same results.
    def strided(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    want = ln(i.x, i.shift, i.scale, i.gate, i.y)
    for got in (ln(strided(i.x), strided(i.shift), i.scale, i.gate, strided(i.y)),):
        assert all(torch.equal(g.float(), w.float()) and g.is_contiguous() for g, w in zip(got, want, strict=True))
    want = gelu(i.a, i.h)
    assert all(torch.equal(g.float(), w.float()) and g.is_contiguous()
               for g, w in zip(gelu(strided(i.a), strided(i.h)), want, strict=True))
    _, q, s = ln(i.x, i.shift[:1], i.scale[:1], None, None)
    assert_e4m3_rows(q, s, exact_modulate(i.x, i.shift[:1].expand(2, -1), i.scale[:1].expand(2, -1)))


def ops_as_kernels():
    """The four ops in the shape of the Triton launchers (fp8.triton_ln_modulate_quant, fp8.triton_gelu_quant)."""
    def ln(x, shift, scale, gate, y):
        if gate is None:
            return None, *torch.ops.flux.ln_modulate_quant(x, shift, scale)
        return torch.ops.flux.add_ln_modulate_quant(x, gate, y, shift, scale)

    def gelu(a, h):
        if h is None:
            return fp8.quantize_fp8(a.float())  # no op of its own: the attention outputs quantize in Float8Linear
        return torch.ops.flux.gelu_quant(h) if a is None else torch.ops.flux.cat_gelu_quant(a, h)

    return ln, gelu


def test_fused_quant_ops_compute_the_exact_formula():
    """The ops' CPU implementation: float32 from bf16, one rounding at the cast."""
    check_fused_quant(*ops_as_kernels())


def test_fused_quant_ops_match_the_eager_fp8_formula(device="cpu"):
    """Against what --no-fp8-fused-quant computes (eager rounds modulate's and GELU's results to bf16 first): the same
    values to within fp8's rounding. Measured: 1.0-2.1e-2 relative (a few percent of the elements one e4m3 step, 6-12%,
    apart); a wrong formula (scale for 1 + scale, a missing shift or gate) is off by order 1."""
    i = fused_quant_inputs(device)
    ln, gelu = ops_as_kernels()

    def close(fused, eager, bound=4e-2):
        (q, s), (q0, s0) = fused, eager
        assert q.shape == q0.shape and s.shape == s0.shape
        assert 0 <= rel_err(q.float() * s, q0.float() * s0) < bound

    close(ln(i.x, i.shift, i.scale, None, None)[1:], fp8.quantize_fp8(oi.modulate(i.x, i.shift, i.scale)))
    x_out, *quantized = ln(i.x, i.shift, i.scale, i.gate, i.y)
    x_eager, h_eager = oi.add_modulate(i.x, i.gate, i.y, i.shift, i.scale)
    assert rel_err(x_out, x_eager) < 4e-3  # one bf16 rounding less
    close(quantized, fp8.quantize_fp8(h_eager))
    close(gelu(None, i.h), fp8.quantize_fp8(oi.gelu_tanh(i.h)))
    close(gelu(i.a, i.h), fp8.quantize_fp8(oi.cat_act(i.a, i.h, oi.gelu_tanh)))


def check_triton_kernels(device: str) -> None:
    check_fused_quant(fp8.triton_ln_modulate_quant, fp8.triton_gelu_quant, device)
    check_flux_widths(device)


def check_flux_widths(device: str) -> None:
    """The kernels at FLUX.1-dev's widths (LayerNorm 3072, GELU 12288, [attention | GELU] 3072 + 12288; blocks of
    4096 and 16384 lanes, partly masked), batch 1 and 2, on the tensors the blocks pass: shift, scale and gate slices
    of a block's modulations, the MLP input a slice of to_qkv_mlp's output. Magnitudes as in the model: a residual
    stream of std 30 with outliers of ±1000, modulation scales of order 1, GELU inputs with a few in the hundreds; a
    row of zeros (LayerNorm's amax is then the shift's; GELU's row is all 0: the 1e-12 floor); no NaN anywhere."""
    dim, mlp, tokens = 3072, 12288, 3
    for batch in (1, 2):
        mods = bf16_randn(batch, 12 * dim, seed=10 + batch).to(device)  # [B, 12 dim] as a double block's slice
        shift, scale, gate = mods[:, dim:2 * dim], mods[:, 4 * dim:5 * dim], mods[:, 7 * dim:8 * dim]
        x = 30 * torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(batch))
        x[..., 7], x[0, 0, 100], x[:, -1] = 900.0, -1000.0, 0.0
        x, y = x.bfloat16().to(device), bf16_randn(batch, tokens, dim, std=50.0, seed=20 + batch).to(device)
        out = bf16_randn(batch, tokens, 3 * dim + mlp, std=3.0, seed=30 + batch)
        out[..., 3 * dim + 5], out[..., 3 * dim + 6], out[:, -1, 3 * dim:] = 200.0, -300.0, 0.0
        h, a = out.to(device)[..., 3 * dim:], bf16_randn(batch, tokens, dim, std=2.0, seed=40 + batch).to(device)
        _, q, s = fp8.triton_ln_modulate_quant(x, shift, scale)
        results = [(q, s, exact_modulate(x, shift, scale))]
        x_out, q, s = fp8.triton_ln_modulate_quant(x, shift, scale, gate, y)
        results.append((q, s, exact_modulate(x_out, shift, scale)))
        results.append((*fp8.triton_gelu_quant(a, h), torch.cat([a.double(), exact_gelu(h)], dim=-1)))
        results.append((*fp8.triton_gelu_quant(None, h), exact_gelu(h)))
        for q, s, exact in results:
            assert q.shape[:2] == (batch, tokens) and torch.isfinite(q.float()).all() and (s > 0).all()
            assert_e4m3_rows(q, s, exact)  # GELU's row of zeros included


def compiled_with_kernels() -> None:
    """The ops launching the Triton kernels (on CPU tensors: Triton's interpreter) inside inductor's compiled code:
    compiled as the blocks are (fullgraph, dynamic shapes), at two token counts, bit for bit the eager ops; the
    kernels are what ran. (The whole model compiled with the kernels: the cuda tests below, at full size; run 32.)"""
    launches = []

    def counting(kernel, *args, **kwargs):
        launches.append(kernel.fn.__name__)
        return launch(kernel, *args, **kwargs)

    launch, fp8.launch = fp8.launch, counting
    fp8.TRITON_DEVICES.add("cpu")
    opcheck_ops()
    check_dynamic_tokens("cpu", "inductor")
    assert set(launches) == {"ln_modulate_quant", "gelu_quant"}, launches


def exact_interpreter_casts() -> None:
    """Triton's interpreter with float32 -> bf16 and -> e4m3 rounded as the GPU rounds them (to nearest even; e4m3
    saturating at 448), by torch. Its own conversion (_convert_float in triton/runtime/interpreter.py) truncates to
    bf16, and rounding to e4m3 does not carry a rounded-up mantissa into the exponent (31.9 becomes 16, not 32): ~1%
    of the elements halved, ~4% off in a quantized row, more than the compiled-vs-eager differences tested here."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert, targets = interpreter._convert_float, {tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16),
                                                    tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8, np.uint8)}

    def exact(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype != tl.float32 or output_dtype not in targets:
            return convert(data, input_dtype, output_dtype, rounding_mode)
        dtype, bits, np_bits = targets[output_dtype]
        x = torch.from_numpy(np.array(data, dtype=np.float32))
        x = x.clamp(-448, 448) if dtype == torch.float8_e4m3fn else x
        return x.to(dtype).view(bits).numpy().view(np_bits)

    interpreter._convert_float = exact


INTERPRETED = {"kernels": "t.check_triton_kernels('cpu')", "compiled": "t.compiled_with_kernels()"}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Each call of INTERPRETED from this module in a process of its own with Triton's interpreter on (its casts
    exact), forked from one that imported this module once (tests/forked.py): the interpreter must be on before triton
    is first imported (inductor may have imported it in this one), or triton.language's own functions are compiled
    ones, which the interpreter cannot call."""
    with Forkserver("import tests.test_fp8 as t\nt.exact_interpreter_casts()", cwd=REPO_ROOT,
                    env={**os.environ, "TRITON_INTERPRET": "1"}) as server:
        return {name: server.run(name, call, ["-c"]) for name, call in INTERPRETED.items()}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_the_interpreter(interpreted):
    assert interpreted["kernels"].returncode == 0, interpreted["kernels"].stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_compiled_ops_launch_the_kernels_in_the_interpreter(interpreted):
    """What run 31 failed at on the H200 (a compiled block calling the kernels, dynamic shapes), on the CPU."""
    assert interpreted["compiled"].returncode == 0, interpreted["compiled"].stderr[-3000:]


def all_fused(x, gate, y, shift, scale, a, h):
    """Every fused function of the blocks, as a compiled block calls them."""
    x, q = fp8.add_modulate_fp8(x, gate, y, shift, scale)
    return x, q, fp8.modulate_fp8(x, shift, scale), fp8.gelu_fp8(h), fp8.cat_gelu_fp8(a, h, oi.gelu_tanh)


def check_dynamic_tokens(device: str, backend: str) -> list[tuple]:
    """all_fused compiled as the blocks are (fullgraph, dynamic shapes): one graph for two token counts, each the
    eager ops' result bit for bit. Returns the arguments of the last call."""
    oi.dynamic_shapes_config()  # as the model compiles (conftest restores dynamo's settings)
    counters.clear()
    compiled = torch.compile(all_fused, fullgraph=True, dynamic=True, backend=backend)
    for tokens in (5, 3):
        i = fused_quant_inputs(device, tokens)
        args = (i.x, i.gate, i.y, i.shift, i.scale, i.a, i.h)
        for got, want in zip(pytree.tree_leaves(compiled(*args)), pytree.tree_leaves(all_fused(*args)), strict=True):
            assert got.shape[:2] == (2, tokens) and torch.equal(got.float(), want.float())
    assert counters["stats"]["unique_graphs"] == 1
    return compiled, args


def opcheck_ops(device: str = "cpu") -> None:
    """torch.library.opcheck on the four ops: the schema (no input mutated, no output aliasing an input), the fake
    implementations' shapes, dtypes and strides against the real outputs', AOT tracing with dynamic shapes; also with
    the width strided and a modulation of batch 1."""
    i = fused_quant_inputs(device)
    strided = i.x.transpose(-1, -2).contiguous().transpose(-1, -2)
    for op, args in ((torch.ops.flux.ln_modulate_quant, (i.x, i.shift, i.scale)),
                     (torch.ops.flux.ln_modulate_quant, (strided, i.shift[:1], i.scale)),
                     (torch.ops.flux.add_ln_modulate_quant, (i.x, i.gate, i.y, i.shift, i.scale)),
                     (torch.ops.flux.gelu_quant, (i.h,)), (torch.ops.flux.cat_gelu_quant, (i.a, i.h))):
        torch.library.opcheck(op, args)


def test_fused_quant_ops_opcheck():
    opcheck_ops()


def test_fused_quant_ops_trace_any_token_count():
    """The ops' shapes follow the inputs' under dynamic shapes (AOT tracing without code generation: fast)."""
    check_dynamic_tokens("cpu", "aot_eager")


def test_fused_quant_model_close_to_unfused():
    """The tiny fp8 model with --fp8-fused-quant against without: other roundings (one bf16 rounding less before each
    cast), the same error against bf16 (measured: fused 0.025, unfused 0.025, fused vs unfused 0.021)."""
    bf16 = tiny_flux()
    fused, unfused = fp8.quantize_fp8_(fp8.bf16_twin(bf16)), fp8.quantize_fp8_(fp8.bf16_twin(bf16), fused=False)
    assert fp8.fused_quant_functions(fused) == 12 and fp8.fused_quant_functions(unfused) == 0
    x, cond = inputs()
    v16, v_fused, v_unfused = velocity(bf16, x, cond), velocity(fused, x, cond), velocity(unfused, x, cond)
    assert 1e-3 < rel_err(v_fused, v16) < 0.06 and rel_err(v_unfused, v16) < 0.06
    assert 0 < rel_err(v_fused, v_unfused) < 0.06
    # The bf16 model never calls the fused functions: the blocks' own are the reference's operations.
    assert fp8.fused_quant_functions(bf16) == 0


# ----------------------------------------------------------------------------------------------------------------------
# PSNR and SSIM
# ----------------------------------------------------------------------------------------------------------------------
def test_psnr_and_ssim():
    yy, xx = np.mgrid[:40, :56]
    a = (127 + 100 * np.sin(xx / 7)[..., None] * np.cos(yy / 9)[..., None] * np.array([1.0, 0.5, -0.7]))
    a = a.round().astype(np.uint8)
    b = (a.astype(int) + (xx * 7 + yy * 13)[..., None] % 17 - 8).clip(0, 255).astype(np.uint8)
    assert fp8.psnr(a, a) == math.inf and fp8.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # scikit-image 0.26: structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=255) and peak_signal_noise_ratio(a, b, data_range=255).
    assert fp8.ssim(a, b) == pytest.approx(0.892483898778358, abs=1e-8)
    assert fp8.psnr(a, b) == pytest.approx(34.32844884649342, abs=1e-9)
    assert fp8.ssim(b, a) == pytest.approx(fp8.ssim(a, b), abs=1e-12)
    # A batch [B, H, W, 3] averages over its images.
    assert fp8.ssim(np.stack([a, a]), np.stack([b, a])) == pytest.approx((0.892483898778358 + 1) / 2, abs=1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# The CLI on the tiny pipeline
# ----------------------------------------------------------------------------------------------------------------------
def cli_args(model_dir: str, output: str, *extra: str) -> list[str]:
    return ["--prompt", PROMPT, "--model", model_dir, "--device", "cpu", "--dtype", "bfloat16", "--height", "40",
            "--width", "56", "--steps", "3", "--max-sequence-length", "48", "--seed", "7", "--warmup", "0",
            "--output", output, *extra]


def test_cli_fp8_with_compare_bf16(tiny_pipeline_dir, tmp_path, capsys):
    timings = tmp_path / "timings.json"
    assert oi.main(cli_args(tiny_pipeline_dir, str(tmp_path / "fp8.png"), "--quantize", "fp8", "--compare-bf16",
                            "--timings-json", str(timings))) == 0
    out = capsys.readouterr().out
    assert "fp8 linear layers=20" in out and "fused projections=6," in out
    line = re.search(r"^fp8 vs bf16 \(eager, seed 7\): velocity relative error (\S+) at the first step, (\S+) at the "
                     r"last \(max (\S+)\); image PSNR (\S+) dB, SSIM (\S+)$", out, re.MULTILINE)
    assert line, out
    report = json.loads(timings.read_text())["fp8_vs_bf16"]
    first, last, worst = (report[f"velocity_rel_err_{k}"] for k in ("first_step", "last_step", "max"))
    assert [float(v) for v in line.groups()] == pytest.approx(
        [first, last, worst, report["image_psnr_db"], report["image_ssim"]], abs=1e-2)
    # Measured on this tiny pipeline: velocity errors 0.031 (first step), 0.034 (last), PSNR 43.5 dB, SSIM 0.9995.
    assert 1e-3 < first <= worst < 0.1 and 1e-3 < last <= worst
    assert 25 < report["image_psnr_db"] < math.inf and 0.95 < report["image_ssim"] < 1


def test_cli_fp8_image_close_to_bf16(tiny_pipeline_dir, tmp_path, capsys):
    paths = [str(tmp_path / name) for name in ("bf16.png", "fp8.png", "keep.png", "unfused.png")]
    assert oi.main(cli_args(tiny_pipeline_dir, paths[0])) == 0
    assert oi.main(cli_args(tiny_pipeline_dir, paths[1], "--quantize", "fp8")) == 0
    assert oi.main(cli_args(tiny_pipeline_dir, paths[2], "--quantize", "fp8", "--fp8-keep-bf16", "1")) == 0
    assert oi.main(cli_args(tiny_pipeline_dir, paths[3], "--quantize", "fp8", "--no-fp8-fused-quant")) == 0
    evidence = [line for line in capsys.readouterr().out.splitlines() if line.startswith("optimizations:")]
    # Fused quant: per double block modulate, add_modulate and both MLPs' GELU, per single block modulate and cat_act
    assert [", ".join(line.split(", ")[-2:]) for line in evidence] == [
        "fp8 linear layers=0, fp8 fused quant=0", "fp8 linear layers=20, fp8 fused quant=12",
        "fp8 linear layers=10, fp8 fused quant=6", "fp8 linear layers=20, fp8 fused quant=0"]
    bf16, quantized, keep, unfused = (np.asarray(Image.open(p).convert("RGB")) for p in paths)
    assert bf16.std() > 10
    assert all(25 < fp8.psnr(image, bf16) < math.inf for image in (quantized, keep, unfused))
    assert (quantized != unfused).any()  # the fused path rounds some activations the other way


def test_fp8_on_gpu_without_fp8_is_one_line_error(tmp_path, capsys, monkeypatch):
    """An A100 (compute capability 8.0) has no float8 tensor cores: refused before any weight is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --device cuda is checked to exist
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    args = cli_args(str(tmp_path / "no-model"), str(tmp_path / "out.png"), "--quantize", "fp8")
    args[args.index("--device") + 1] = "cuda"
    assert oi.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --quantize fp8 needs float8 tensor cores (compute capability 8.9 or newer, e.g. L4, "
                   "H100); NVIDIA A100-SXM4-80GB has 8.0"]


def test_fp8_without_scaled_mm_is_one_line_error(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_scaled_mm' with arguments from the 'CPU' backend.\nmore")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    assert oi.main(cli_args(str(tmp_path / "no-model"), str(tmp_path / "out.png"), "--quantize", "fp8")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quantize fp8: torch ") and "'CPU' backend." in err[0]


def test_fp8_flags_default_to_options():
    """Without fp8 flags main() builds the default Options: nothing of fp8 is on."""
    args = oi.build_parser().parse_args(["--prompt", "x"])
    assert oi.Options() == oi.Options(**{f: getattr(args, f) for f in ("quantize", "fp8_keep_bf16", "compare_bf16")})


# ----------------------------------------------------------------------------------------------------------------------
# GPU: FLUX.1-dev's GEMMs and the full-size compiled step (run on the device: pytest -m cuda -s tests/test_fp8.py)
# ----------------------------------------------------------------------------------------------------------------------
# (tokens, in, out) of every linear layer in the blocks at 1024x1024 with 512 text tokens: double blocks' image
# stream (4096 tokens) and text stream (512), single blocks (4608).
FLUX_GEMMS = [(4096, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072),
              (512, 3072, 9216), (512, 3072, 3072), (512, 3072, 12288), (512, 12288, 3072),
              (4608, 3072, 21504), (4608, 15360, 3072)]


@pytest.mark.cuda
@pytest.mark.parametrize("fast_accum", [True, False], ids=["fast-accum", "fp32-accum"])
@torch.no_grad()
def test_float8_linear_at_flux_shapes_cuda(fast_accum, monkeypatch, record_property):
    """Error against float32 and speed against bf16 for every GEMM shape of a step; random data, never zeros."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 tensor cores on this GPU")
    monkeypatch.setattr(fp8, "FP8_FAST_ACCUM", fast_accum)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2 * len(FLUX_GEMMS))  # one graph per shape
    rows = []
    for m, k, n in FLUX_GEMMS:
        lin = random_linear(k, n, torch.bfloat16, "cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        f8 = fp8.Float8Linear(lin)
        compiled = torch.compile(f8, fullgraph=True)  # as in the step: quantization fused into one kernel
        expected = x.float() @ lin.weight.float().t() + lin.bias.float()
        err_bf16, err_fp8, err_compiled = (rel_err(f(x), expected) for f in (lin, f8, compiled))
        assert err_fp8 < 5e-2 and err_compiled < 5e-2 and err_bf16 < 1e-2
        qx, sx = fp8.quantize_fp8(x)
        flop = 2 * m * k * n
        gemm_only = functools.partial(torch._scaled_mm, qx, f8.weight.t(), scale_a=sx, scale_b=f8.scale,
                                      bias=f8.bias, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        timed = {"bf16": functools.partial(lin, x), "fp8_gemm": gemm_only,
                 "fp8_compiled": functools.partial(compiled, x)}
        tflops = {name: flop / cuda_seconds(fn) / 1e12 for name, fn in timed.items()}
        rows.append(dict(shape=(m, k, n), err_bf16=err_bf16, err_fp8=err_fp8, err_compiled=err_compiled, **tflops))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, use_fast_accum={fast_accum}")
    print(f"{'tokens x in -> out':>22} {'err bf16':>9} {'err fp8':>8} {'TFLOP/s bf16':>13} {'fp8 gemm':>9} "
          f"{'fp8 +quant (compiled)':>22}")
    for r in rows:
        m, k, n = r["shape"]
        print(f"{f'{m} x {k} -> {n}':>22} {r['err_bf16']:9.4f} {r['err_fp8']:8.4f} {r['bf16']:13.0f} "
              f"{r['fp8_gemm']:9.0f} {r['fp8_compiled']:22.0f}")
    record_property("fp8_gemms", rows)


@pytest.mark.cuda
@torch.no_grad()
def test_fused_quant_kernels_cuda():
    """--fp8-fused-quant on the GPU: the Triton kernels compiled for it against the exact formulas; the ops against
    the eager fp8 formula; opcheck; compiled as the blocks are (inductor, dynamic shapes) at two token counts and
    replayed in a CUDA graph (twice, on new input values), bit for bit the eager ops; and what runs is the Triton
    kernels, not the ops' torch twins."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 on this GPU")
    check_triton_kernels("cuda")
    check_fused_quant(*ops_as_kernels(), device="cuda")
    opcheck_ops("cuda")
    test_fused_quant_ops_match_the_eager_fp8_formula("cuda")
    compiled, args = check_dynamic_tokens("cuda", "inductor")
    want = pytree.tree_leaves(all_fused(*args))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        compiled(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*args)
    for _ in range(2):  # the replay writes every output (NaN before it), from the inputs' values at the time
        for t in pytree.tree_leaves(out):
            t.view(torch.uint8).fill_(255)  # NaN in float32, bf16 and e4m3
        graph.replay()
        torch.cuda.synchronize()
        for got, expected in zip(pytree.tree_leaves(out), want, strict=True):
            assert torch.equal(got.float(), expected.float())
        for a in args:
            a.mul_(-0.5)
        want = pytree.tree_leaves(all_fused(*args))
    from profiling import kernels_per_call

    names = " ".join(kernels_per_call(functools.partial(compiled, *args)))
    assert "ln_modulate_quant" in names and "gelu_quant" in names, names


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [True, False], ids=["fused-quant", "no-fused-quant"])
@torch.no_grad()
def test_full_size_fp8_step_cuda(fused, record_property):
    """FLUX.1-dev size, random weights: the compiled, CUDA-graphed fp8 step against the eager fp8 and bf16 models,
    and its time per step (x 28: the denoiser time to hold against the issue's 2.3 s on an H100); with and without
    --fp8-fused-quant."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 tensor cores on this GPU")
    opts = oi.effective_options(oi.Options(quantize="fp8", fp8_fused_quant=fused), torch.device("cuda"))
    cfg = oi.CONFIGS["flux-dev"]
    with oi.default_dtype(torch.bfloat16):
        with torch.device("meta"):
            bf16 = oi.Flux(cfg, opts)
        bf16 = oi.init_random_(bf16.to_empty(device="cuda")).eval().requires_grad_(False)
    quantized = fp8.quantize_fp8_(fp8.bf16_twin(bf16), fused=fused)
    assert fp8.fused_quant_functions(quantized) == (19 * 4 + 38 * 2 if fused else 0)
    pipe = oi.Pipeline(cfg, quantized, None, None, None, None, None, "random", torch.device("cuda"), torch.bfloat16,
                       opts)
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    txt = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
    t, g = torch.full((1,), 0.5, device="cuda"), torch.full((1,), 3.5, device="cuda")
    cond = quantized.condition(txt, torch.zeros(512, 3, device="cuda"), oi.image_ids(128, 128, "cuda"), t, g, pooled)
    v16, v8 = bf16(x, **cond), quantized(x, **cond)
    oi.compile_blocks(quantized, oi.compile_options(opts))  # as load_pipeline does (regional compilation)
    one = torch.ones((), device="cuda")  # with dt = 1 the Euler step returns x + v
    step = oi.step_function(pipe, x, one, cond)
    assert isinstance(step, oi.CUDAGraphStep)
    v_graphed = step(x, one, cond).float() - x.float()
    err_fp8, err_graphed = rel_err(v8, v16), rel_err(v_graphed, v16)
    step_ms = 1000 * cuda_seconds(functools.partial(step, x, one, cond), warmup=3, iters=10)
    print(f"\nfull size, random weights, fused quant {fused}: velocity rel. error vs bf16: eager fp8 {err_fp8:.4f}, "
          f"compiled and graphed fp8 {err_graphed:.4f}; fp8 step {step_ms:.1f} ms, x 28 = {28 * step_ms / 1000:.2f} s")
    record_property("fp8_full_size", dict(fused=fused, err_fp8=err_fp8, err_graphed=err_graphed, step_ms=step_ms))
    assert torch.isfinite(v8).all() and v16.float().std() > 0.1
    assert err_fp8 < 0.1
    # The compiled step quantizes float32 activations where eager rounds them to bf16 first: other roundings, the
    # same error level (tiny model on the CPU: 0.027 compiled, 0.029 eager). Plus bf16 rounding of x + v.
    assert err_graphed < 1.5 * err_fp8 + 1e-2
