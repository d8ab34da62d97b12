"""The peers' rows of benchmark.py: xDiT, ParaAttention and cache-dit, each on benchmark.py's own FluxPipeline.

benchmark.py's worker builds the pipeline (the same random weights for every row) and times it; a peer only adds
its setup step on that pipeline, as the peer's own documentation configures FLUX.1-dev on one GPU:

  xdit               xfuser 0.7.0's runner for FLUX.1-dev (xfuser/model_executor/models/runner_models/flux.py):
                     the transformer as xFuserFlux1Transformer2DWrapper (xDiT's attention processor), xDiT's
                     distributed state for one process, torch.compile(mode="reduce-overhead") of the transformer
  para-attn          ParaAttention 0.3.38's FLUX recipe (doc/fastest_flux.md, parallel_examples/run_flux.py):
                     parallelize_pipe + parallelize_vae on a context-parallel mesh over the process group (one process,
                     or one per GPU under torchrun: para-attn-cpN), torch.compile(mode="max-autotune-no-cudagraphs")
                     of the transformer
  para-attn-fbcache  lossy: the same plus First Block Cache at the doc's FLUX threshold, residual_diff_threshold=0.08
                     (fails with diffusers 0.42: ParaAttention 0.3.38 calls FLUX's single blocks without the
                     encoder_hidden_states argument diffusers has since added; the row reports it)
  cache-dit          cache-dit 1.5.3's examples with --compile and no --cache (cache_dit/_utils/utils.py):
                     set_compile_configs(), then compile_repeated_blocks() of the transformer
  cache-dit-dbcache  lossy: the same plus the examples' --cache --taylorseer: DBCache F1B0, threshold 0.12, 8 warm-up
                     steps, at most 3 cached steps in a row, TaylorSeer order 1

One shim: ParaAttention 0.3.38's attention functions are given diffusers 0.42's enable_gqa=False (without_enable_gqa).
fp8 rows of the peers are not here: ParaAttention's and cache-dit's fp8 go through torchao, not on the GPU image.
xDiT's one-GPU lossy option for FLUX (--cache_method dbcache) runs cache-dit's DBCache engine with xDiT's own preset
(Fn=2, threshold 0.12, SCM "ultra") on blocks compiled one by one: not a row here; cache-dit-dbcache measures the
engine. The packages are optional (requirements-peers.txt); this module imports each only in its setup.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peer:
    """A peer's row: the distribution it needs, whether it changes the output, and its setup on the pipeline.

    setup(pipe, args) changes the pipeline in place and may return a function to call before every request (None:
    nothing to do per request). cached_steps(pipe), for a row with a step cache: how many of the last request's
    steps the cache served. A cache decides from how much the first blocks' output changed since the last step, which
    depends on the weights: with random weights it may serve none, and the row then times the compute of every step."""

    package: str
    lossy: bool
    setup: Callable
    cached_steps: Callable | None = None


def package_version(package: str) -> str | None:
    """The installed version of a distribution, without importing it; None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def not_installed(package: str) -> str | None:
    """The error of a row whose package is missing, saying what to install; None when it is installed."""
    if package_version(package) is not None:
        return None
    return f"{package} is not installed: pip install --no-deps -r requirements-peers.txt (offline: README, Peers)"


def init_single_process_group(device: torch.device) -> None:
    """A process group for the peers that need one: torchrun's, or a group of this one process.

    ParaAttention's mesh and xDiT's runtime state are built on torch.distributed even on one GPU."""
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:  # not under torchrun: a world of one, on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(torch.distributed.destroy_process_group)  # else NCCL's exit warning ends a failed row's log


# ----------------------------------------------------------------------------------------------------------------------
# xDiT
# ----------------------------------------------------------------------------------------------------------------------
def setup_xdit(pipe, args):
    from xfuser import xFuserArgs
    from xfuser.core.distributed import get_runtime_state, init_distributed_environment, initialize_runtime_state
    from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

    init_single_process_group(torch.device(args.device))
    init_distributed_environment()  # xDiT's groups over the process group above
    engine_config, _ = xFuserArgs(model=args.model, height=args.height, width=args.width,
                                  num_inference_steps=args.steps, max_sequence_length=args.max_sequence_length,
                                  guidance_scale=args.guidance, seed=args.seed,
                                  use_torch_compile=True).create_config()
    # xDiT's FLUX transformer is diffusers' class with xDiT's attention processor: built on the meta device and
    # given the pipeline's own weights, so that every row runs the same numbers.
    with torch.device("meta"):
        wrapper = xFuserFlux1Transformer2DWrapper.from_config(pipe.transformer.config)
    wrapper.load_state_dict(pipe.transformer.state_dict(), assign=True)
    pipe.transformer = wrapper.eval()
    initialize_runtime_state(pipe, engine_config)
    # xDiT's runner compiles FLUX's whole transformer with CUDA graphs when no step cache is on (_get_compile_mode).
    pipe.transformer = torch.compile(pipe.transformer, mode="reduce-overhead")

    def before_request():  # as xDiT's runner does before every pipeline call (xFuserFluxModel._run_pipe)
        get_runtime_state().set_input_parameters(height=args.height, width=args.width, batch_size=args.batch_size,
                                                 num_inference_steps=args.steps,
                                                 max_condition_sequence_length=args.max_sequence_length,
                                                 split_text_embed_in_sp=True)

    return before_request


# ----------------------------------------------------------------------------------------------------------------------
# ParaAttention
# ----------------------------------------------------------------------------------------------------------------------
def without_enable_gqa(attention):
    """ParaAttention's attention function, taking diffusers' enable_gqa argument.

    diffusers 0.42 passes enable_gqa=False to every SDPA call; ParaAttention 0.3.38 hands the call's arguments to
    its Ulysses and ring functions, which predate that argument and fail on it. False is what they do anyway."""

    @functools.wraps(attention)
    def call(*args, enable_gqa: bool = False, **kwargs):
        if enable_gqa:
            raise ValueError("ParaAttention's attention has no grouped-query mode")
        return attention(*args, **kwargs)

    return call


def setup_para_attn(pipe, args, fbcache_threshold: float | None = None):
    from para_attn import para_attn_interface
    from para_attn.context_parallel import init_context_parallel_mesh
    from para_attn.context_parallel.diffusers_adapters import parallelize_pipe
    from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_pipe
    from para_attn.parallel_vae.diffusers_adapters import parallelize_vae

    for name in ("ulysses_attn_func", "ring_attn_func"):
        setattr(para_attn_interface, name, without_enable_gqa(getattr(para_attn_interface, name)))
    init_single_process_group(pipe.device)
    mesh = init_context_parallel_mesh(pipe.device.type, max_ring_dim_size=2)  # the doc's mesh
    parallelize_pipe(pipe, mesh=mesh)
    parallelize_vae(pipe.vae, mesh=mesh._flatten())
    if fbcache_threshold is not None:
        apply_cache_on_pipe(pipe, residual_diff_threshold=fbcache_threshold)
    torch._inductor.config.reorder_for_compute_comm_overlap = True  # the doc's setting; acts with several GPUs
    pipe.transformer = torch.compile(pipe.transformer, mode="max-autotune-no-cudagraphs")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# cache-dit
# ----------------------------------------------------------------------------------------------------------------------
def setup_cache_dit(pipe, args, dbcache: bool = False):
    import cache_dit

    if dbcache:  # the examples' --cache --taylorseer, at their defaults
        cache_dit.enable_cache(
            pipe,
            cache_config=cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=8,
                                                 warmup_interval=1, max_cached_steps=-1,
                                                 max_continuous_cached_steps=3, residual_diff_threshold=0.12),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1),
            attention_backend="native")
    # The examples' --compile: cache-dit's inductor settings, then one compiled graph per kind of block.
    cache_dit.set_compile_configs()
    torch.set_float32_matmul_precision("high")
    pipe.transformer.compile_repeated_blocks()
    return None


def cache_dit_cached_steps(pipe) -> int:
    """The steps of the last request that DBCache served from its cache (cache-dit's own statistics)."""
    import cache_dit

    return len(cache_dit.summary(pipe, logging=False)[0].cached_steps)


PEERS = {
    "xdit": Peer("xfuser", lossy=False, setup=setup_xdit),
    "para-attn": Peer("para-attn", lossy=False, setup=setup_para_attn),
    "para-attn-fbcache": Peer("para-attn", lossy=True,
                              setup=lambda pipe, args: setup_para_attn(pipe, args, fbcache_threshold=0.08)),
    "cache-dit": Peer("cache-dit", lossy=False, setup=setup_cache_dit),
    "cache-dit-dbcache": Peer("cache-dit", lossy=True, setup=lambda pipe, args: setup_cache_dit(pipe, args, True),
                              cached_steps=cache_dit_cached_steps),
}
