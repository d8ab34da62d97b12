"""Context parallelism for optimized_inference.py: under `torchrun --nproc-per-node N` the N processes share every
image.

Each process holds 1/N of the text tokens and 1/N of the image tokens, runs every per-token op (linears, norms,
modulation, RoPE, GELU, residuals) on those alone, and meets the others only inside attention
(context_parallel_attention) and once at the end, to gather the latents. All ranks run the same compiled step and
CUDA graph. Imported only under torchrun (WORLD_SIZE > 1), like gpt-fast's tp.py.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from optimized_inference import Pipeline, UserError, attention


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Cut x into N equal pieces along scatter_dim, send piece i to rank i of `group`, and join the N pieces received
    along gather_dim in rank order. A functional collective, so torch.compile traces it into the compiled graph
    (the block's, or the whole step's) and a CUDA graph can capture it, instead of breaking the graph there as
    torch.distributed.all_to_all would."""
    pieces = torch.stack(x.chunk(group.size(), dim=scatter_dim))  # [N, ...]: piece i goes to rank i
    pieces = funcol.all_to_all_single(pieces, None, None, group)  # [N, ...]: piece i came from rank i
    return torch.cat(pieces.unbind(0), dim=gather_dim)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                               group: dist.ProcessGroup) -> torch.Tensor:
    """attention() over a sequence spread across the N ranks of `group`: q, k, v [B, S/N, H, D] -> [B, S/N, H*D].

    Ulysses-style: an all-to-all trades "all heads of my tokens" for "H/N heads of all tokens", attention runs as on
    one GPU, and a second all-to-all trades back. Each rank's rows are [its text tokens, its image tokens], RoPE
    already applied, so the gathered sequence is the single-GPU one permuted. Unmasked attention does not mind: every
    query still sums over every key, and each output row follows its query back to the rank it came from.
    """
    # q, k and v in one collective: fewer, larger messages.
    qkv = all_to_all(torch.stack([q, k, v]), scatter_dim=3, gather_dim=2, group=group)  # [3, B, S, H/N, D]
    out = attention(*qkv.unbind(0), backend=backend)  # [B, S, H/N * D]
    out = all_to_all(out.unflatten(-1, (-1, q.shape[-1])), scatter_dim=1, gather_dim=2, group=group)
    return out.flatten(2)  # [B, S/N, H*D]


# Context parallelism: under `torchrun --nproc-per-node N` the N processes share every image. Each holds 1/N of the
# text tokens and 1/N of the image tokens, runs every per-token op (linears, norms, modulation, RoPE, GELU,
# residuals) on those alone, and meets the others only inside attention (context_parallel_attention) and once at
# the end, to gather the latents. All ranks run the same compiled step and CUDA graph.
def init_distributed(device: str) -> tuple[str, dist.ProcessGroup | None]:
    """Join torchrun's process group and take this rank's GPU: returns (device, group).

    NCCL between GPUs, gloo between CPU processes. Only rank 0 prints: the other ranks' stdout goes to /dev/null
    (their stderr stays, so a crash on any rank is still reported).
    """
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))  # communicators now, before any capture
    else:
        dist.init_process_group("gloo")
    atexit.register(dist.destroy_process_group)  # on every way out: NCCL warns about a group left undestroyed
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device, dist.group.WORLD


def enable_context_parallel(pipe: Pipeline, group: dist.ProcessGroup) -> None:
    """Spread each image's tokens over the ranks of `group`: denoise() shards them, every attention exchanges them."""
    heads, n = pipe.cfg.num_attention_heads, group.size()
    if heads % n:
        raise UserError(f"context parallelism over {n} processes needs the number of attention heads to be "
                        f"divisible by {n}, got {heads} (each process attends with an equal share of them)")
    if pipe.bf16_transformer is not None:
        raise UserError("--compare-bf16 runs on one GPU, not under torchrun")
    pipe.group = group
    backend = pipe.opts.attention
    pipe.transformer.set_attention(functools.partial(context_parallel_attention, backend=backend, group=group))
    print(f"context parallel over {n} processes: each holds 1/{n} of the tokens and attends with {heads // n} heads")


def shard_tokens(x, txt, txt_ids, img_ids, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """This rank's share of the image tokens x [B, L_img, C], the text tokens txt [B, L_txt, D] and their positions
    [L, 3]: the r-th of N equal blocks of each. Attention sees [text block, image block] per rank, a permutation of
    the one-GPU sequence, and the RoPE tables condition() makes from these positions are this rank's rows."""
    n, r = group.size(), group.rank()
    for what, length, source in (("image", x.shape[1], "--height/--width"),
                                 ("text", txt.shape[1], "--max-sequence-length or the text bucket")):
        if length % n:
            raise UserError(f"context parallelism over {n} processes needs the number of {what} tokens to be "
                            f"divisible by {n}, got {length} (from {source})")
    return [t.chunk(n, dim=-2)[r] for t in (x, txt, txt_ids, img_ids)]


def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse of shard_tokens for the latents [B, L_img / N, C]: every rank gets all image tokens, in order."""
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)

