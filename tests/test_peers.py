"""benchmark.py's peer rows (peers.py): lossy rows labeled everywhere, a missing peer a failed row, the lossless peers
bit for bit diffusers' latents, and a CPU smoke run of a peer row (ParaAttention and cache-dit run on the CPU; xDiT
needs triton and a GPU)."""

import importlib.util
import json
import math
import sys

import pytest
import torch

import benchmark
import peers

# torch.compile stubbed out: on the CPU each peer's compile of even the tiny model takes one to two minutes (measured:
# cache-dit 62 s, para-attn 121 s for the row), which the GPU run pays for; the setup around it is what runs here.
EAGER = "import torch; torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda m: m)"


def test_every_peer_row_runs_a_peer_and_every_lossy_row_sits_with_our_fp8_ones():
    names = list(benchmark.ROWS)
    for name, peer in peers.PEERS.items():
        assert benchmark.ROWS[name] == benchmark.Row(benchmark.SCRIPT, ("--worker", name), lossy=peer.lossy,
                                                     package=peer.package)
    lossy = [name for name in names if benchmark.ROWS[name].lossy]
    assert lossy == ["opt-fp8", "opt-fp8-keep1", "opt-fp8-unfused", "opt-attn8", "opt-fp8-attn8",
                     "para-attn-fbcache", "cache-dit-dbcache"]
    assert names[-len(lossy):] == lossy  # the lossy rows come last, together


def test_context_parallel_rows_run_under_torchrun_and_need_their_gpus(tiny_pipeline_dir, monkeypatch):
    args = benchmark.parse_args(["--smoke", "--model", tiny_pipeline_dir])
    cmd = benchmark.row_command(benchmark.ROWS["para-attn-cp4"], args, "/scratch")
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                       benchmark.__file__]
    assert cmd[6:8] == ["--worker", "para-attn"]
    assert benchmark.ROWS["opt-cp2"] == benchmark.Row("optimized_inference.py", ("--no-text-buckets",), nproc=2)
    assert benchmark.too_few_gpus(benchmark.ROWS["opt-cp2"], args) is None  # on the CPU, gloo: any count
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args.device = "cuda"
    assert benchmark.too_few_gpus(benchmark.ROWS["opt-cp2"], args) == "needs 2 GPUs, this machine has 1"
    assert benchmark.too_few_gpus(benchmark.ROWS["opt+attention"], args) is None


def test_lossy_rows_are_labeled_and_a_missing_peer_is_a_failed_row(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """Two peers that are not installed, one lossy: failed at once (no process), each labeled as it should be."""
    for name, lossy in (("absent-lossy", True), ("absent", False)):
        monkeypatch.setitem(benchmark.ROWS, name, benchmark.Row(benchmark.SCRIPT, ("--worker", "xdit"), lossy=lossy,
                                                                package=f"no-such-{name}-pkg"))
    # The lossy row first, to see that the table still puts it below the lossless one.
    status = benchmark.main(["--smoke", "--model", tiny_pipeline_dir, "--configs", "absent-lossy,absent",
                             "--out-dir", str(tmp_path)])
    assert status == 1
    assert "FAILED: no-such-absent-pkg is not installed" in capsys.readouterr().out

    rows = {r["config"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == ["absent-lossy", "absent"]  # failed rows, not missing ones
    assert [rows[n]["lossy"] for n in rows] == [True, False]
    absent = rows["absent"]
    assert absent["status"] == "failed" and absent["denoiser"] is None
    assert absent["error"].startswith("no-such-absent-pkg is not installed: pip install --no-deps -r requirements")
    assert absent["package"] == "no-such-absent-pkg" and absent["package_version"] is None
    assert (tmp_path / "absent.log").read_text().startswith("no-such-absent-pkg is not installed")

    table = (tmp_path / "results.md").read_text()
    lossless_at, lossy_at = table.index("Lossless:"), table.index("Lossy (")
    assert lossless_at < table.index("| absent | failed: no-such-absent-pkg is not installed") < lossy_at
    assert lossy_at < table.index("| absent-lossy (lossy) | failed: ")
    assert "Peers: no-such-absent-lossy-pkg (not installed), no-such-absent-pkg (not installed)" in table
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


# Diffusers' latents, then the same pipeline's after the peer's setup; the seeds and request are the --smoke ones.
LOSSLESS = """
args = benchmark.parse_args(["--smoke", "--model", sys.argv[1]])
pipe = FluxPipeline.from_pretrained(args.model)
pipe.set_progress_bar_config(disable=True)
diffusers_latents = benchmark.peer_generate(pipe, args, Timer(torch.device("cpu")))
before_request = peers.PEERS[sys.argv[2]].setup(pipe, args)
latents = benchmark.peer_generate(pipe, args, Timer(torch.device("cpu")), before_request)
print("max abs difference", (latents - diffusers_latents).abs().max().item())
# That the setup took: ParaAttention marks the transformer it parallelized, cache-dit compiles each block.
blocks = pipe.transformer.transformer_blocks
print("applied", getattr(pipe.transformer, "_is_parallelized", False)
      or all(block._compiled_call_impl is not None for block in blocks))
"""

# A row's command as benchmark.py runs it, its script as __main__.
ROW = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"

CACHED = """
import cache_dit
config = cache_dit.DBCacheConfig  # any change counts as small: every step after the warm-up may come from the cache
cache_dit.DBCacheConfig = lambda **kwargs: config(**{**kwargs, "residual_diff_threshold": 1e9})
args = benchmark.parse_args(["--smoke", "--model", sys.argv[1]])
args.steps = 12
pipe = FluxPipeline.from_pretrained(args.model)
pipe.set_progress_bar_config(disable=True)
peers.PEERS["cache-dit-dbcache"].setup(pipe, args)
for _ in range(2):
    benchmark.peer_generate(pipe, args, Timer(torch.device("cpu")))
    print("cached", peers.PEERS["cache-dit-dbcache"].cached_steps(pipe))
"""


@pytest.fixture(scope="module")
def peer_jobs(forkserver, tiny_pipeline_dir, tmp_path_factory):
    """The jobs of the tests below whose peer is installed, each in a process of its own (the peers patch diffusers'
    classes) forked from one that has imported torch, diffusers and benchmark.py (conftest.forkserver), each job
    stubbing torch.compile out before anything else: {name: exit status and output}, and the row's timings folder."""
    row_dir = tmp_path_factory.mktemp("peer_row")
    args = benchmark.parse_args(["--smoke", "--model", tiny_pipeline_dir, "--out-dir", str(row_dir)])
    cmd = benchmark.row_command(benchmark.ROWS["cache-dit-dbcache"], args, str(row_dir))
    jobs = {}
    for name in ("para-attn", "cache-dit"):
        if importlib.util.find_spec(peers.PEERS[name].package.replace("-", "_")):
            jobs[f"lossless {name}"] = (LOSSLESS, ["-c", tiny_pipeline_dir, name])
    if importlib.util.find_spec("cache_dit"):
        jobs["row"] = (ROW, ["-c", *cmd[1:]])
        jobs["cached"] = (CACHED, ["-c", tiny_pipeline_dir])
    return {name: forkserver.run(name, f"{EAGER}\n{code}", argv, timeout=120)
            for name, (code, argv) in jobs.items()}, row_dir


@pytest.mark.parametrize("name", ["para-attn", "cache-dit"])
def test_a_lossless_peer_gives_diffusers_latents_on_the_cpu(name, peer_jobs):
    """Eager float32 on the tiny pipeline: the peer's setup (ParaAttention's mesh and attention mode with
    peers.without_enable_gqa; cache-dit's compile settings) leaves diffusers' numbers bit for bit."""
    pytest.importorskip(peers.PEERS[name].package.replace("-", "_"))
    proc = peer_jobs[0][f"lossless {name}"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max abs difference 0.0\napplied True" in proc.stdout


def test_a_peer_row_runs_on_the_cpu_tiny_pipeline(peer_jobs):
    """cache-dit-dbcache (cache-dit's row plus its cache) run as benchmark.py runs a row. para-attn-fbcache fails with
    diffusers 0.42: ParaAttention 0.3.38's First Block Cache calls FLUX's single blocks without encoder_hidden_states,
    an argument diffusers has since added; its row reports that error. xDiT needs a GPU (xfuser imports triton, and
    its process group has no CPU backend)."""
    pytest.importorskip("cache_dit")
    results, row_dir = peer_jobs
    proc = results["row"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timings = json.loads((row_dir / "timings.json").read_text())
    assert len(timings["runs"]) == benchmark.SMOKE["runs"]
    for stage in benchmark.STAGES:
        assert 0 < timings[stage]["median"] < math.inf
    assert timings["cached_steps"] == 0  # 2 steps, all inside DBCache's 8 warm-up steps


def test_a_cache_row_counts_the_steps_its_cache_served(peer_jobs):
    """What the report's "steps served from a cache" reads: with every change below the threshold, DBCache serves
    12 - 8 warm-up steps at most 3 in a row, so 3 steps of each request (the count is per request, not cumulative)."""
    pytest.importorskip("cache_dit")
    proc = peer_jobs[0]["cached"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cached 3\ncached 3\n" in proc.stdout


def test_a_failed_row_reports_the_exception_not_the_exit_warnings(tmp_path):
    """As run 30's para-attn-fbcache log ended: torchrun's rank prefix, the exception, then NCCL's warning at exit."""
    log = tmp_path / "row.log"
    log.write_text("$ python benchmark.py --worker para-attn-fbcache\n"
                   "[rank0]:     return forward_call(*args, **kwargs)\n"
                   "[rank0]: TypeError: FluxSingleTransformerBlock.forward() missing 1 required positional argument\n"
                   "[rank0]:[W1201 13:28:29.322078289 ProcessGroupNCCL.cpp:1575] Warning: WARNING: "
                   "destroy_process_group() was not called before program exit\n\n")
    start = len(log.read_text().splitlines()[0]) + 1
    assert benchmark.error_line(str(log), start) == (
        "TypeError: FluxSingleTransformerBlock.forward() missing 1 required positional argument")
    log.write_text("$ cmd\nsomething went wrong without a traceback\n")
    assert benchmark.error_line(str(log), 6) == "something went wrong without a traceback"
