"""Context parallelism (optimized_inference.py under torchrun) on the CPU: 2 processes talking over gloo.

Splitting an image's tokens across processes must not change the numbers: the velocity, the sampled latents and the
image equal the single-process ones. The model-level checks run in processes forked by torch.multiprocessing (real
processes, a real process group) from one that has imported torch and run nothing else; the CLI runs exactly as a user
launches it, under torchrun.
"""

import dataclasses
import functools
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import context_parallel as cp
import optimized_inference as oi
from tests.helpers import REPO_ROOT, max_pixel_diff, read_png, rel_err

WORLD = 2

# 4 heads, so that each of the 2 ranks gets 2 and the head order inside a rank's share is exercised too.
CFG = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
           joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(2, 2, 4), scheduler=oi.FLUX_DEV_SCHEDULER)
OPTS = oi.Options(attention="sdpa", compile=False, cuda_graphs=False)
BATCH, H, W, TXT_LEN = 2, 8, 12, 6  # latent grid 8x12: 24 image tokens; 6 text tokens


def make_model() -> oi.Flux:
    """The same random model in every process: the weights are a function of the seed only."""
    with torch.device("meta"):
        model = oi.Flux(oi.FluxConfig(**CFG), OPTS)
    return oi.init_random_(model.to_empty(device="cpu"), seed=3).eval()


def make_pipe(model: oi.Flux, **opts) -> oi.Pipeline:
    return oi.Pipeline(cfg=model.cfg, transformer=model, clip=None, t5=None, clip_tokenizer=None, t5_tokenizer=None,
                       vae=None, model_name="tiny", device=torch.device("cpu"), dtype=torch.float32,
                       opts=dataclasses.replace(OPTS, **opts))


def make_inputs():
    gen = torch.Generator().manual_seed(5)
    return dict(noise=torch.randn(BATCH, 4, H, W, generator=gen), txt=torch.randn(BATCH, TXT_LEN, 32, generator=gen),
                pooled=torch.randn(BATCH, 24, generator=gen), timestep=torch.tensor([0.9, 0.4]))


@torch.no_grad()
def context_parallel_worker(rank: int, store: str, out_dir: str) -> None:
    """One of WORLD processes: the single-process results and the context-parallel ones, saved for the test."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    group, results = dist.group.WORLD, {}
    try:
        inp = make_inputs()
        x = oi.pack(inp["noise"])
        txt_ids, img_ids = torch.zeros(TXT_LEN, 3), oi.image_ids(H, W, "cpu")
        guidance = torch.full((BATCH,), 3.5)

        # Velocity with precomputed conditioning, as denoise() runs it: one process vs two.
        single, parallel = make_model(), make_model()
        cond = single.condition(inp["txt"], txt_ids, img_ids, inp["timestep"], guidance, inp["pooled"])
        expected = oi.velocity(single, x, cond)
        pipe = make_pipe(parallel)
        cp.enable_context_parallel(pipe, group)
        x_s, txt_s, txt_ids_s, img_ids_s = cp.shard_tokens(x, inp["txt"], txt_ids, img_ids, group)
        cond_s = parallel.condition(txt_s, txt_ids_s, img_ids_s, inp["timestep"], guidance, inp["pooled"])
        v_s = oi.velocity(parallel, x_s, cond_s)
        results["shard_shapes"] = (tuple(x_s.shape), tuple(cond_s["txt"].shape), tuple(cond_s["cos"].shape))
        results["velocity"] = rel_err(cp.gather_tokens(v_s, group), expected)
        # Control: the same shards attending only to their own rank's tokens are far off.
        results["local_only"] = rel_err(cp.gather_tokens(oi.velocity(single, x_s, cond_s), group), expected)

        # The step compiles as one graph, all-to-alls included (inductor needs a GPU here; aot_eager traces the same).
        step = torch.compile(functools.partial(oi.euler_step, parallel), fullgraph=True, backend="aot_eager")
        dt = torch.tensor(-0.25)
        results["compiled"] = rel_err(step(x_s, dt, cond_s), oi.euler_step(parallel, x_s, dt, cond_s))

        # The whole sampler, with and without precomputed conditioning.
        sigmas = oi.flow_match_sigmas(3, x.shape[1], oi.FLUX_DEV_SCHEDULER)
        for precompute in (True, False):
            args = (inp["noise"], inp["txt"], inp["pooled"], sigmas, 3.5)
            latents = oi.denoise(make_pipe(single, precompute=precompute), *args)
            par = make_pipe(parallel, precompute=precompute)
            cp.enable_context_parallel(par, group)
            results[f"denoise_precompute={precompute}"] = rel_err(oi.denoise(par, *args), latents)

        # Bad input: every rank raises before any collective, so none waits for the others.
        try:
            cp.shard_tokens(x, inp["txt"][:, :5], txt_ids[:5], img_ids, group)
        except oi.UserError as e:
            results["odd_text_error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(out_dir: str, timeout: float = 300) -> None:
    """The WORLD workers, forked from this process, which has torch imported already (spawned, each would import it
    again: 12 s instead of 6 s for the two); killed if they have not finished in `timeout` s."""
    workers = mp.start_processes(context_parallel_worker, args=(os.path.join(out_dir, "store"), out_dir),
                                 nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not workers.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in workers.processes:
                process.kill()
            raise TimeoutError(f"the context-parallel workers did not finish in {timeout} s")


@pytest.fixture(scope="module")
def parallel_results(forkserver, tmp_path_factory):
    """run_workers in a process of its own, forked from one that has imported torch and run nothing else
    (conftest.forkserver): no thread of this one, no code it compiled, is in the workers."""
    out = tmp_path_factory.mktemp("context_parallel")
    run = forkserver.run("context parallel", "import tests.test_parallel as t; t.run_workers(sys.argv[1])",
                         ["-c", str(out)])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_velocity_matches_single_process(parallel_results):
    for rank, r in enumerate(parallel_results):
        # Each rank holds half of the 24 image and 6 text tokens, and the RoPE rows of its 3 + 12 tokens.
        assert r["shard_shapes"] == ((BATCH, 12, 16), (BATCH, 3, 32), (15, 8)), rank
        assert r["velocity"] < 1e-5, (rank, r["velocity"])
        assert r["local_only"] > 1e-3, (rank, r["local_only"])  # measured 1.6e-2, the split 7e-8


def test_compiled_step_matches_eager(parallel_results):
    for rank, r in enumerate(parallel_results):
        assert r["compiled"] < 1e-5, (rank, r["compiled"])


@pytest.mark.parametrize("precompute", [True, False], ids=["precompute", "no-precompute"])
def test_denoise_matches_single_process(precompute, parallel_results):
    for rank, r in enumerate(parallel_results):
        assert r[f"denoise_precompute={precompute}"] < 1e-5, (rank, r)


def test_odd_text_length_is_a_user_error(parallel_results):
    for r in parallel_results:
        assert "text tokens to be divisible by 2, got 5" in r["odd_text_error"]


# ----------------------------------------------------------------------------------------------------------------------
# The CLI under torchrun, on the tiny pipeline
# ----------------------------------------------------------------------------------------------------------------------
# 64x64 pixels: a 16x16 latent grid (the tiny VAE downsamples 4x), 64 image tokens; 48 text tokens.
CLI = ["--prompt", "a red cat on a blue chair", "--device", "cpu", "--dtype", "float32", "--height", "64",
       "--width", "64", "--steps", "3", "--max-sequence-length", "48", "--no-text-buckets", "--seed", "7"]

# Imported by every process that starts with this folder on PYTHONPATH: logs each file written in $WATCH_DIR, by rank
# (not the folder itself, which check_writable opens for a nameless temporary file that writes nothing).
WRITE_WATCHER = """\
import os, sys
if "RANK" in os.environ:
    def _hook(event, args, watch=os.environ["WATCH_DIR"] + os.sep, log=os.environ["WATCH_LOG"] + os.environ["RANK"]):
        if event == "open" and str(args[0]).startswith(watch) and set(str(args[1])) & set("wax+"):
            with open(log, "a") as f:
                f.write(str(args[0]) + "\\n")
    sys.addaudithook(_hook)
"""


def torchrun(nproc: int, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N optimized_inference.py ARGS` (torchrun is torch.distributed.run)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "optimized_inference.py", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_under_torchrun_matches_single_process(tiny_pipeline_dir, tmp_path, monkeypatch):
    single = tmp_path / "single.png"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert oi.main([*CLI, "--model", tiny_pipeline_dir, "--output", str(single)]) == 0

    out_dir, hooks = tmp_path / "out", tmp_path / "hooks"
    out_dir.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WRITE_WATCHER)
    proc = torchrun(WORLD, [*CLI, "--model", tiny_pipeline_dir, "--output", str(out_dir / "parallel.png")],
                    env={"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
                         "WATCH_DIR": str(out_dir), "WATCH_LOG": str(tmp_path / "writes-rank")})
    assert proc.returncode == 0, proc.stdout + proc.stderr

    ours, reference = read_png(out_dir / "parallel.png"), read_png(single)
    assert reference.std() > 10
    assert max_pixel_diff(ours, reference) <= 1
    # Only rank 0 wrote the image (a temporary file, renamed) and printed.
    assert os.listdir(out_dir) == ["parallel.png"]
    assert (tmp_path / "writes-rank0").read_text().splitlines() == [str(out_dir / "parallel.png.tmp")]
    assert not (tmp_path / "writes-rank1").exists()
    for line in ("saved ", "denoiser time: ", "optimizations: "):
        assert proc.stdout.count(line) == 1, proc.stdout


def test_heads_not_divisible_by_the_processes_is_a_user_error():
    """Checked before any exchange (the torchrun path of such an error: the test below)."""
    three = type("Group", (), {"size": lambda self: 3})()
    with pytest.raises(oi.UserError, match="number of attention heads to be divisible by 3, got 4"):
        cp.enable_context_parallel(make_pipe(make_model()), three)


def test_cli_under_torchrun_bad_split_is_one_line_error(tiny_pipeline_dir, tmp_path):
    """An image whose tokens do not split over the processes: one error line from rank 0, nothing written."""
    needle = "number of image tokens to be divisible by 2, got 35"
    proc = torchrun(2, [*CLI, "--height", "40", "--width", "56", "--model", tiny_pipeline_dir,
                        "--output", str(tmp_path / "out.png")])
    assert proc.returncode != 0
    # The other rank's progress bar may end without a newline just before rank 0's error: find it mid-line too.
    errors = re.findall(r"(?<!\w)error: [^\n]*", proc.stderr)
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert 'optimized_inference.py", line' not in proc.stderr  # no traceback of ours (torchrun adds its own report)
    assert os.listdir(tmp_path) == []
