"""--prompts-file for optimized_inference.py: many prompts, sizes and seeds in one process, batched; a compile cache
that outlives the machine's /tmp (--compile-cache); and --offload-text-encoders, for GPUs too small to hold the text
encoders next to the transformer.

    python optimized_inference.py --prompts-file prompts.jsonl --batch-size 4 --output-dir outputs

Imported only when one of those flags is given.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from optimized_inference import (
    MAX_SIDE,
    Pipeline,
    Request,
    Timer,
    UserError,
    as_user_error,
    describe,
    generate,
    save_png,
)


@dataclass
class Job:
    """One image of a --prompts-file."""

    index: int
    prompt: str
    prompt_2: str
    seed: int
    height: int
    width: int
    steps: int
    guidance: float
    lora: tuple = ()  # ((file, scale), ...): "lora": [[file, scale], ...] on the line, else the --lora flags


def parse_job(line: str, index: int, defaults: dict, multiple: int) -> Job:
    """A plain-text line is a prompt; a line starting with "{" is a JSON object with "prompt" and any of JOB_FIELDS."""
    if line.startswith("{"):
        try:
            fields_ = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from e
        unknown = sorted(set(fields_) - set(defaults) - {"prompt"})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: prompt, {', '.join(sorted(defaults))}")
    else:
        fields_ = {"prompt": line}
    job = {**defaults, "seed": defaults["seed"] + index, **fields_}
    if not isinstance(job["prompt"], str) or not job["prompt"].strip():
        raise ValueError("empty prompt")
    for key in ("seed", "height", "width", "steps"):
        if not isinstance(job[key], int):
            raise ValueError(f"{key} must be an integer, got {job[key]!r}")
    if not 0 <= job["seed"] < 2**64:  # torch's seeds are 64-bit
        raise ValueError(f"seed must be 0 to 2**64 - 1, got {job['seed']}")
    # Python's JSON reads NaN and Infinity as numbers.
    if not isinstance(job["guidance"], int | float) or not (math.isfinite(job["guidance"]) and job["guidance"] >= 0):
        raise ValueError(f"guidance must be a finite number >= 0, got {job['guidance']!r}")
    if not (isinstance(job["lora"], list | tuple) and all(
            isinstance(pair, list | tuple) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], int | float) for pair in job["lora"])):
        raise ValueError(f"lora must be a list of [file, scale] pairs, got {job['lora']!r}")
    if job["steps"] <= 0:
        raise ValueError(f"steps must be positive, got {job['steps']}")
    for key in ("height", "width"):
        if not 0 < job[key] <= MAX_SIDE or job[key] % multiple:
            raise ValueError(f"{key} must be a multiple of {multiple} up to {MAX_SIDE}, got {job[key]}")
    return Job(index=index, prompt_2=job.get("prompt_2") or job["prompt"], lora=tuple(map(tuple, job["lora"])),
               **{k: job[k] for k in ("prompt", "seed", "height", "width", "steps", "guidance")})


def read_prompts_file(path: str, defaults: dict, multiple: int, strict: bool) -> list[Job]:
    """Bad lines are reported with their line number and skipped, or with `strict` stop the run before any image."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from e
    jobs, problems = [], []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                jobs.append(parse_job(line.strip(), len(jobs), defaults, multiple))
            except ValueError as e:
                problems.append(f"{path}:{number}: {e}")
    for problem in problems:
        print(f"warning: skipping {problem}", file=sys.stderr)
    if problems and strict:
        raise UserError(f"{len(problems)} bad line(s) in {path}, first {problems[0]}; --strict: nothing generated")
    if not jobs:
        raise UserError(f"no prompts in {path}")
    return jobs


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs of one shape, steps and guidance share a forward pass, up to batch_size of them."""
    out = []
    for job in jobs:
        same = out and len(out[-1]) < batch_size and all(
            getattr(out[-1][0], k) == getattr(job, k) for k in ("height", "width", "steps", "guidance", "lora"))
        out[-1].append(job) if same else out.append([job])
    return out


def job_metadata(job: Job, metadata: dict) -> dict:
    """What the job's PNG records: the run's metadata and everything that decides the image."""
    return {**metadata, "prompt": job.prompt, "prompt_2": job.prompt_2, "seed": job.seed, "steps": job.steps,
            "guidance": job.guidance, "size": f"{job.width}x{job.height}", "lora": [list(p) for p in job.lora]}


def already_written(path: str, metadata: dict) -> bool:
    """The image is there, whole (it decodes), and its PNG text says it was made from this very job."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.text == {k: str(v) for k, v in metadata.items()}
    except (OSError, SyntaxError, ValueError):  # missing, cut short or not a PNG: make it again
        return False


def generate_many(pipe: Pipeline, jobs: list[Job], batch_size: int, max_sequence_length: int, output_dir: str,
                  metadata: dict, overwrite: bool = False) -> None:
    """Every job, batch by batch, each image handed to a writer thread as soon as its batch is done; then a
    throughput line. A rerun into the same folder skips the images already written for the same job (unless
    `overwrite`), so a killed run loses only the work in flight: save_png's rename never leaves a cut-short PNG.

    A batch's time is its generation: its PNGs are written while the next batch runs. The wait for the last writes
    is added to the last batch, so "N images in T s" is the wall time from the first batch to the last file written.
    A failed write stops the run at the end of the batch it overlapped; on any exception the images made so far are
    still written before it goes on up."""
    path = lambda job: os.path.join(output_dir, f"{job.index:04d}-{job.seed}.png")  # noqa: E731
    todo = jobs if overwrite else [j for j in jobs if not already_written(path(j), job_metadata(j, metadata))]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} images are already in {output_dir}: skipped (--overwrite "
              "makes them again)")
    done, writes = [], []  # (shape, images, seconds) per batch; the writes not yet checked, oldest first
    # PNG encoding (~0.2 s per 1024² image) runs on a writer thread: zlib releases the GIL, so the GPU starts the
    # next batch meanwhile. Leaving the with block waits for every write, also when an exception is on its way out.
    with ThreadPoolExecutor(max_workers=1) as writer:
        for batch in tqdm(batches(todo, batch_size), desc="prompts", unit="batch"):
            t0, first = time.perf_counter(), batch[0]
            if hasattr(pipe.transformer, "loras"):  # the batch's LoRAs, in place of the last batch's
                pipe.transformer.loras.apply(first.lora)
            req = Request([j.prompt for j in batch], [j.prompt_2 for j in batch], first.height, first.width,
                          first.steps, first.guidance, [j.seed for j in batch], max_sequence_length)
            try:
                images = generate(pipe, req, Timer(pipe.device))
            except (MemoryError, RuntimeError) as e:  # out of memory: this batch's size, not the flags'
                raise as_user_error(e, len(batch), first.height, first.width) from e
            if images is None:  # a rank other than 0 of a context-parallel run: rank 0 saves
                continue
            os.makedirs(output_dir, exist_ok=True)  # with the first image: a run that fails before leaves no folder
            # generate returns new arrays each batch (decode's .numpy() of a new tensor): nothing changes them later.
            writes += [writer.submit(save_png, image, path(job), job_metadata(job, metadata))
                       for job, image in zip(batch, images, strict=True)]
            while writes and writes[0].done():  # a failed write (a full disk) stops the run here, not at the end
                writes.pop(0).result()
            shape = (len(batch), first.height, first.width, pipe.seen["t5_tokens"])
            if all(shape != d[0] for d in done):
                tqdm.write(f"{first.width}x{first.height}, batch {len(batch)}, {shape[3]} T5 tokens: first batch in "
                           f"{time.perf_counter() - t0:.1f}s")
            done.append((shape, len(batch), time.perf_counter() - t0))
        waited_from = time.perf_counter()
    for write in writes:  # all finished: the with block waited for them
        write.result()
    if done:  # the last batch carries the wait for the last writes: the total is wall time to the last file
        shape, count, seconds = done[-1]
        done[-1] = (shape, count, seconds + time.perf_counter() - waited_from)
        print(f"{throughput(done)}; written to {output_dir}")


def throughput(done: list[tuple[tuple, int, float]]) -> str:
    """The throughput line from (shape, images, seconds) per batch: the first batch of each shape (batch size, size,
    T5 length) carries that shape's compile and capture, the VAE's included, and is counted as warm-up; images/hour
    is the rate of the batches after it, the steady state."""
    seen, warmup_s, steady = set(), 0.0, [0, 0.0]
    for shape, images, seconds in done:
        if shape in seen:
            steady[0] += images
            steady[1] += seconds
        else:
            seen.add(shape)
            warmup_s += seconds
    line = (f"{sum(d[1] for d in done)} images in {warmup_s + steady[1]:.1f}s: warm-up {warmup_s:.1f}s (the first "
            f"batch of each of {len(seen)} shapes, with compile and capture)")
    if not steady[0]:
        return line + ", no shape repeated, so no steady-state rate"
    return line + f", then {steady[0]} images at {3600 * steady[0] / steady[1]:.0f} images/hour"


# What a single --prompt run reads and a prompts file does not: given with --prompts-file, refused, not ignored.
ONE_PROMPT_FLAGS = ("prompt", "output", "warmup", "runs", "timings_json", "profile", "compare_bf16")


def check_prompts_file_args(args, defaults) -> None:
    """Before anything is loaded: the flags, the file can be read and the images' folder can be made and written."""
    if unread := [f"--{name.replace('_', '-')}" for name in ONE_PROMPT_FLAGS
                  if getattr(args, name) != getattr(defaults, name)]:
        raise UserError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not used with --prompts-file")
    try:
        open(args.prompts_file).close()
    except OSError as e:
        raise UserError(f"cannot read {args.prompts_file}: {e.strerror}") from e
    folder = os.path.abspath(args.output_dir)  # or the nearest folder above it, where generate_many makes it
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write images into {args.output_dir}: {folder} is not a writable directory "
                        f"({e.strerror})") from e


def lora_files(path: str) -> tuple[str, ...]:
    """The LoRA files that the file's lines name, read before the model is loaded (lora.LoraWeights keeps the base
    values of the weights they touch); a malformed line is reported later, by read_prompts_file."""
    files = set()
    try:
        with open(path) as f:
            for line in f:
                try:
                    fields_ = json.loads(line) if line.lstrip().startswith("{") else {}
                    files |= {pair[0] for pair in fields_.get("lora", ()) if isinstance(pair[0], str)}
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    continue
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from e
    return tuple(sorted(files))


def run_prompts_file(pipe: Pipeline, args) -> None:
    """--prompts-file: the flags give each line's defaults."""
    cfg = pipe.cfg
    defaults = dict(prompt_2=args.prompt_2, seed=args.seed, height=args.height, width=args.width, lora=pipe.opts.lora,
                    steps=args.steps or cfg.default_steps,
                    guidance=cfg.default_guidance if args.guidance is None else args.guidance)
    jobs = read_prompts_file(args.prompts_file, defaults, 2 * pipe.vae_scale_factor, args.strict)
    generate_many(pipe, jobs, args.batch_size, args.max_sequence_length or cfg.max_sequence_length, args.output_dir,
                  {"model": pipe.model_name, "random_weights": args.random_weights}, args.overwrite)
    if pipe.is_main_rank:
        print(describe(pipe))


def offload_layerwise(encoder: nn.Module, device) -> None:
    """--offload-text-encoders: the weights live in CPU memory and each layer is copied to the GPU for its own forward
    only (accelerate's sequential offload). Moving a whole encoder in to encode would not lower the peak: T5's 9.5 GB
    would sit next to the transformer's 23.8 GB while encoding."""
    from accelerate import cpu_offload

    cpu_offload(encoder, execution_device=torch.device(device))


def use_compile_cache(directory: str) -> str | None:
    """--compile-cache: inductor's and AOTAutograd's caches in `directory` (torch keeps them in /tmp by default), so
    that a process after a reboot still skips most of the compile work, and Python's bytecode where the environment
    writes none; 'none' switches them off. Returns where the blocks' graphs are saved whole (precompile.py: a warm
    process traces nothing), or None where they cannot be."""
    if directory == "none":
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
        return None
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        print(f"warning: no compile cache in {directory} ({e}); using torch's default", file=sys.stderr)
        return None
    if sys.dont_write_bytecode:  # PYTHONDONTWRITEBYTECODE, as Docker's Python images and BENCHMARKS.md's GPU set it
        # Else every process compiles the libraries' Python source again: what is imported from here on (dynamo,
        # inductor, transformers, diffusers: ~10 s of a warm start there, run 44) keeps its bytecode in `directory`.
        sys.pycache_prefix, sys.dont_write_bytecode = os.path.join(directory, "pycache"), False
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    import precompile

    if not precompile.available():
        print(f"note: torch {torch.__version__} cannot save compiled graphs (torch 2.11 or later can): a warm start "
              "traces the blocks again", file=sys.stderr)
        return None
    return os.path.join(directory, "precompiled")
