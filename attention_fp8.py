"""--attention cudnn-fp8 for optimized_inference.py: attention with q, k and v in float8 e4m3, through cuDNN's fp8
attention kernel, called with NVIDIA's cuDNN frontend for Python (`pip install nvidia-cudnn-frontend`, `import cudnn`).

Opt-in and lossy, never chosen by --attention auto. At FLUX's shape [1, 24, 4608, 128] on an H200 the kernel ran at
1.42x the bf16 cuDNN kernel and replayed inside a CUDA graph; with per-tensor scales its output was 0.11-0.37 off a
float32 attention, more the peakier the attention (shared/reference/attention_8bit_h200_2026-12-01.md): scores are
sums of q_i k_i, so e4m3's 3-bit mantissa on q and k becomes noise on the scores that softmax exponentiates. Rounding
one tensor at a time (float32 emulation, the probe's gain-1 inputs, 0.107 in all): q 0.064, k 0.078, v 0.026, the
stored softmax numerators 0.010, the output 0.026.

What runs per call, in this order:
  1. plain torch ops (fused by torch.compile into the kernels around them): one scale per tensor for q, k, v, as
     cuDNN's fp8 kernel takes them, computed on the GPU (no host sync: CUDA graphs and compiled regions keep them);
     k and v are "smoothed" first, their mean over the tokens subtracted per head and channel (below); then the cast
     to e4m3 in cuDNN's [B, H, S, D] layout;
  2. the cuDNN kernel, as the custom op flux::cudnn_fp8_attention, so that torch.compile(fullgraph=True) traces
     around it (its fake implementation gives the output's shape); its cuDNN graph is built once per shape;
  3. plain torch again: the e4m3 output (Hopper's fp8 kernel writes fp8, with one scale) back to bf16, the mean of v
     added back, in [B, S, H*D] for the output projection.

Smoothing changes nothing in exact arithmetic and shrinks what is rounded where a tensor has a common offset over
the tokens (trained projections give k and v one; random weights hardly do). K: every score of a query moves by the
same q.mean(k), which softmax cancels. V: the attention weights of a query sum to 1, so P (V - mean) + mean = P V.
With an offset 3x the spread over the tokens the error halves (tests: 0.135 -> 0.074 in k, 0.037 -> 0.022 in v).
A scale per head instead of per tensor would buy nothing but subnormals: e4m3 rounds relative to each value.

Imported only where --attention cudnn-fp8 is used (resolve_attention); the cuDNN frontend only when a graph is built.
On the CPU the choice is refused; tests/test_attention_fp8.py checks the math here against float32 attention with an
emulation of the kernel, registered as the op's CPU implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optimized_inference import UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# The kernel stores the softmax numerators exp(s - rowmax), in [0, 1], as fp8 for the P.V product: scaled by 448 so
# that the largest lands on e4m3's largest value.
P_SCALE = FP8_MAX


def quantize(x: torch.Tensor, smooth: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [B, S, H, D] -> (x8 [B, H, S, D] e4m3, contiguous; descale [1, 1, 1, 1] float32 with x8 * descale ~ x - mean;
    mean [B, 1, H, D] over the tokens, or None without `smooth`).

    One scale for the whole tensor maps its largest magnitude to 448. The amax is taken in two stages, so that it
    stays parallel where fp8's compile turns split reductions off (optimized_inference.compile_options): first per
    token and head, the rows q's RMSNorm + RoPE kernel already reduces over (so it fuses there), then over those.
    Smoothed, the largest |x - mean| comes from the pass that takes the mean (per channel: its max and min too); v
    needs a pass for its amax anyway, k pays one.
    """
    xf = x.float()
    if smooth:
        mean = xf.mean(dim=1, keepdim=True)
        amax = torch.maximum(xf.amax(dim=1, keepdim=True) - mean, mean - xf.amin(dim=1, keepdim=True)).amax()
        xf = xf - mean
    else:
        mean, amax = None, xf.abs().amax(dim=-1).amax()
    amax = amax.clamp(min=1e-12)
    # As fp8.quantize_fp8: one reciprocal, a multiply per element, and a clamp for products that round past 448.
    x8 = (xf * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8).transpose(1, 2).contiguous()
    return x8, (amax / FP8_MAX).reshape(1, 1, 1, 1), mean


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """8-bit attention, [B, S, H, D] -> [B, S, H*D] in q's dtype: optimized_inference.attention's cudnn-fp8 kernel."""
    q8, descale_q, _ = quantize(q, smooth=False)  # subtracting q's mean would move each key's score differently
    k8, descale_k, _ = quantize(k, smooth=True)
    v8, descale_v, v_mean = quantize(v, smooth=True)
    # |P (V - mean)| <= max |V - mean| per element, as the weights sum to 1: v's scale keeps the output within e4m3.
    o8 = torch.ops.flux.cudnn_fp8_attention(q8, k8, v8, descale_q, descale_k, descale_v, 1 / descale_v)
    return (o8.transpose(1, 2).float() * descale_v + v_mean).to(q.dtype).flatten(2)


# ----------------------------------------------------------------------------------------------------------------------
# The cuDNN kernel as a custom op
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class CudnnGraph:
    """One built cuDNN fp8 attention graph, for one shape on one device, with the names of its operands."""

    graph: object
    handle: object
    operands: dict  # name -> the graph's tensor
    workspace_bytes: int
    softmax_scales: tuple[torch.Tensor, torch.Tensor]  # (1 / P_SCALE, P_SCALE): built here, outside any capture


GRAPHS: dict[tuple, CudnnGraph] = {}  # (device index, B, H, S_q, S_kv, D) -> graph; describe() lists the shapes
HANDLES: dict[int, object] = {}  # device index -> cuDNN handle


def build_graph(key: tuple, device: torch.device) -> CudnnGraph:
    """cuDNN's fp8 SDPA forward over contiguous [B, H, S, D] e4m3 operands: q k^T / sqrt(D) with float32 accumulation
    and softmax, P as e4m3 times P_SCALE, P.V, and the output in e4m3 times scale_o (Hopper writes fp8 only)."""
    import cudnn

    if torch.cuda.is_current_stream_capturing():  # building allocates and synchronizes: not inside a CUDA graph
        raise RuntimeError(f"cudnn-fp8 attention: no graph for shape {key[1:]} yet; run once before capturing")
    _, b, h, s_q, s_kv, d = key
    with torch.cuda.device(device):
        if device.index not in HANDLES:
            HANDLES[device.index] = cudnn.create_handle()
        handle = HANDLES[device.index]
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

        def operand(name, shape):
            stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
            return g.tensor(name=name, dim=list(shape), stride=stride, data_type=e4m3)

        ops = {name: operand(name, (b, h, s, d)) for name, s in (("q", s_q), ("k", s_kv), ("v", s_kv))}
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            ops[name] = g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        ops["o"], _, ops["amax_s"], ops["amax_o"] = g.sdpa_fp8(
            q=ops["q"], k=ops["k"], v=ops["v"], descale_q=ops["descale_q"], descale_k=ops["descale_k"],
            descale_v=ops["descale_v"], descale_s=ops["descale_s"], scale_s=ops["scale_s"], scale_o=ops["scale_o"],
            is_inference=True, attn_scale=1 / math.sqrt(d), use_causal_mask=False, name="sdpa")
        ops["o"].set_output(True).set_dim([b, h, s_q, d]).set_stride([h * s_q * d, s_q * d, d, 1]).set_data_type(e4m3)
        for name in ("amax_s", "amax_o"):  # the amax of P and O, which a training step would use for its next scales
            ops[name].set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        try:
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
        except Exception as e:  # the frontend's own types (not supported, no plan): a choice this GPU cannot run
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            raise UserError(f"--attention cudnn-fp8: cuDNN {torch.backends.cudnn.version()} has no fp8 attention for "
                            f"[B, H, S, D] = {[b, h, s_q, d]} ({s_kv} keys) on {torch.cuda.get_device_name(device)} "
                            f"({reason}); choose another --attention") from e
        scales = tuple(torch.full((1, 1, 1, 1), s, device=device) for s in (1 / P_SCALE, P_SCALE))
        return CudnnGraph(g, handle, ops, g.get_workspace_size(), scales)


@torch.library.custom_op("flux::cudnn_fp8_attention", mutates_args=(), device_types="cuda")
def cudnn_fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                        descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over e4m3 [B, H, S, D] operands with per-tensor scales ([1, 1, 1, 1] float32, on the
    GPU: descale_x = 1 / x's scale); returns e4m3 [B, H, S_q, D] holding the output times scale_o.

    Everything allocated per call (output, workspace) comes from torch's allocator, so a CUDA graph captures it;
    the scales are read by the kernel from GPU memory, so new values need no new graph."""
    q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
    (b, h, s_q, d), s_kv = q8.shape, k8.shape[2]
    key = (q8.device.index, b, h, s_q, s_kv, d)
    import cudnn

    if key not in GRAPHS:
        GRAPHS[key] = build_graph(key, q8.device)
    g = GRAPHS[key]
    # The handle launches on its stream: the current one (a capture stream while a CUDA graph is recorded).
    cudnn.set_stream(handle=g.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
    o8 = torch.empty_like(q8)
    amax_s, amax_o = (torch.empty(1, 1, 1, 1, device=q8.device) for _ in range(2))
    workspace = torch.empty(g.workspace_bytes, device=q8.device, dtype=torch.uint8)
    descale_s, scale_s = g.softmax_scales
    data = {"q": q8, "k": k8, "v": v8, "descale_q": descale_q, "descale_k": descale_k, "descale_v": descale_v,
            "descale_s": descale_s, "scale_s": scale_s, "scale_o": scale_o, "o": o8, "amax_s": amax_s,
            "amax_o": amax_o}
    g.graph.execute({g.operands[name]: tensor for name, tensor in data.items()}, workspace, handle=g.handle)
    return o8


@cudnn_fp8_attention.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o):
    return torch.empty_like(q8, memory_format=torch.contiguous_format)


def describe() -> str:
    """The shapes the kernel ran at, for optimized_inference.describe(): evidence that cuDNN's fp8 kernel was called."""
    return "cuDNN fp8 graphs " + " ".join("x".join(map(str, key[1:])) for key in GRAPHS) if GRAPHS else "no graph built"


def check_cudnn_fp8_support(device: torch.device) -> None:
    """Before any weight is loaded: a Hopper or newer GPU, the cuDNN frontend, and one small fp8 attention that runs
    (the cuDNN that torch ships decides what it supports). The small graph is not kept: GRAPHS lists the model's."""
    built_before = set(GRAPHS)
    capability = torch.cuda.get_device_capability(device)
    if capability < (9, 0):
        raise UserError(f"--attention cudnn-fp8 needs cuDNN's fp8 attention, on Hopper or newer GPUs (compute "
                        f"capability 9.0+, e.g. H100); {torch.cuda.get_device_name(device)} has "
                        f"{'.'.join(map(str, capability))}")
    try:
        import cudnn  # noqa: F401  (its graphs are built below, by attention())
    except (ImportError, OSError) as e:
        raise UserError(f"--attention cudnn-fp8 needs NVIDIA's cuDNN frontend for Python: pip install "
                        f"nvidia-cudnn-frontend ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from e
    try:
        x = torch.randn(1, 256, 2, 128, device=device, dtype=torch.bfloat16)
        attention(x, x, x)
        torch.cuda.synchronize(device)
    except UserError:  # build_graph's, which says it all
        raise
    except Exception as e:  # the frontend raises its own types (not supported, bad plan) as well as RuntimeError
        raise UserError(f"--attention cudnn-fp8: cuDNN {torch.backends.cudnn.version()} cannot run fp8 attention on "
                        f"{torch.cuda.get_device_name(device)} ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]})") from e
    finally:
        for key in set(GRAPHS) - built_before:
            del GRAPHS[key]
