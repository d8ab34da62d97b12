"""Dynamic shapes and saved compiled graphs (precompile.py, --compile-cache): three sizes compile one graph per block
kind, traced once, and draw the eager model's images; a second process loads the graphs, traces nothing and draws
the same images; a graph saved for anything else (another key, a damaged file) is never loaded.

The first process runs here, the second in a process of its own, as a warm start runs: forked from one that has
imported what it needs and run nothing else (conftest.forkserver; on the GPU, a new process). Dynamo's counters and
cache entries of that process, not flags, show that nothing was traced."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import optimized_inference as opt
import precompile
import prompts_file
from tests.helpers import REPO_ROOT, max_pixel_diff, read_png

pytestmark = pytest.mark.skipif(not precompile.available(), reason="torch before 2.11 cannot save compiled graphs")

SIZES = [(40, 56), (64, 32), (48, 48)]  # 35, 32 and 36 image tokens: one dynamic graph per block kind serves all


def compiled_on(device: str = "cpu", quantize: str = "none") -> opt.Options:
    """The defaults on `device`; on the CPU compiled blocks forced (there the default is eager), no CUDA graphs."""
    opts = opt.effective_options(opt.Options(text_buckets=False, quantize=quantize), torch.device(device))
    return dataclasses.replace(opts, compile=True)


def jobs() -> list[prompts_file.Job]:
    defaults = dict(prompt_2=None, seed=3, height=40, width=56, lora=(), steps=2, guidance=3.5)
    return [prompts_file.parse_job(json.dumps({"prompt": f"a red cat {i}", "height": h, "width": w}), i, defaults, 8)
            for i, (h, w) in enumerate(SIZES)]


def draw(model_dir: str, precompiled: str, output_dir: str, device: str = "cpu", quantize: str = "none") -> dict:
    """One process's work: the tiny pipeline compiled with saved graphs in `precompiled`, the three sizes drawn into
    `output_dir` (on a GPU in bf16 and CUDA graphs); returns what dynamo and the saved graphs show."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch._dynamo.config.enable_aot_compile = False  # torch 2.11's default (run 31): precompile.py switches it on
    pipe = opt.load_pipeline(model_dir, device, dtype, compiled_on(device, quantize), precompiled=precompiled)
    prompts_file.generate_many(pipe, jobs(), 1, 16, output_dir, {})
    return {"traced": counters["stats"]["unique_graphs"],
            "tracing": "bytecode_tracing" in torch._dynamo.utils.compilation_time_metrics,
            "restarts": "compile_attempt_1" in torch._dynamo.utils.compilation_time_metrics,
            "dynamo entries": sum(len(torch._dynamo.eval_frame._debug_get_cache_entry_list(f))
                                  for f in (opt.DoubleStreamBlock.forward, opt.SingleStreamBlock.forward)),
            "loaded": [k.loaded for k in pipe.transformer.precompiled],
            "compiled": [k.compiled for k in pipe.transformer.precompiled],
            "describe": opt.describe(pipe)}


@pytest.fixture(scope="module")
def first_process(tiny_pipeline_dir, tmp_path_factory):
    """Compiles and saves the graphs (in this process); returns the directories and what it showed."""
    root = tmp_path_factory.mktemp("precompile")
    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.utils.compilation_time_metrics.clear()
    shown = draw(tiny_pipeline_dir, str(root / "graphs"), str(root / "first"))
    return root, shown


@torch.no_grad()
def test_three_sizes_compile_the_blocks_once_and_draw_the_eager_images(first_process, tiny_pipeline_dir):
    root, first = first_process
    assert first["traced"] == 2 and first["compiled"] == [1, 1] and first["loaded"] == [0, 0], first
    assert not first["restarts"]  # each block kind traced once (dynamic_shapes_config), every size served by it
    assert "compiled graphs=2 for 3 step shapes, precompiled graphs loaded/compiled=0/2" in first["describe"]
    assert len(os.listdir(root / "graphs")) == 2
    opts = dataclasses.replace(compiled_on(), compile=False)
    pipe = opt.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts)
    for job in jobs():
        alone = opt.generate(pipe, opt.Request([job.prompt], [job.prompt], job.height, job.width, job.steps,
                                               job.guidance, [job.seed], 16), opt.Timer(pipe.device))[0]
        assert max_pixel_diff(read_png(root / "first" / f"{job.index:04d}-{job.seed}.png"), alone) <= 1


SECOND = "import json, sys; from tests.test_precompile import draw; print(json.dumps(draw(*sys.argv[1:])))"


def second_process(model_dir: str, root, *device_and_quantize: str, forkserver=None) -> dict:
    """draw() in a process of its own (a new one, or one forked by `forkserver`), with the graphs the first one
    saved; checks that it traced nothing and drew the first process's images, pixel for pixel."""
    args = [model_dir, str(root / "graphs"), str(root / "second"), *device_and_quantize]
    if forkserver is None:
        run = subprocess.run([sys.executable, "-c", SECOND, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300)
    else:
        run = forkserver.run("second process", SECOND, ["-c", *args])
    assert run.returncode == 0, run.stderr
    second = json.loads(run.stdout.splitlines()[-1])
    assert second["traced"] == 0 and not second["tracing"] and second["dynamo entries"] == 0, second
    assert second["compiled"] == [0, 0] and second["loaded"] == [1, 1], second
    names = sorted(os.listdir(root / "first"))
    assert names == sorted(os.listdir(root / "second")) and len(names) == len(SIZES)
    for name in names:
        assert max_pixel_diff(read_png(root / "first" / name), read_png(root / "second" / name)) == 0
    return second


def test_a_warm_process_loads_the_saved_graphs_and_traces_nothing(first_process, tiny_pipeline_dir, forkserver):
    second = second_process(tiny_pipeline_dir, first_process[0], forkserver=forkserver)
    assert "compiled graphs=2 for 3 step shapes, precompiled graphs loaded/compiled=2/0" in second["describe"]


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_saved_graphs_under_cuda_graphs(tiny_pipeline_dir, tmp_path, quantize):
    """On the GPU (bf16, each shape captured as a CUDA graph; fp8 too): the warm process traces nothing and draws the
    same pixels."""
    first = draw(tiny_pipeline_dir, str(tmp_path / "graphs"), str(tmp_path / "first"), "cuda", quantize)
    assert first["compiled"] == [1, 1] and "cuda graphs=3" in first["describe"], first
    second = second_process(tiny_pipeline_dir, tmp_path, "cuda", quantize)
    assert "cuda graphs=3" in second["describe"] and "precompiled graphs loaded/compiled=2/0" in second["describe"]


def test_a_graph_saved_for_anything_else_is_not_loaded(first_process, tiny_pipeline_dir, tmp_path, capsys,
                                                      monkeypatch):
    """A graph of another key planted under this key's name, and a damaged file: each is reported, removed and not
    loaded. An edit to a traced source changes the key, so no graph of the old code is even looked at."""
    root, _ = first_process
    opts = compiled_on()
    block = opt.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts).transformer.transformer_blocks[0]
    saved = sorted((root / "graphs").glob("DoubleStreamBlock-*.pt"))[0]
    directory = tmp_path / "graphs"

    def load(opts_) -> precompile.PrecompiledBlocks:
        return precompile.PrecompiledBlocks(block, str(directory), opts_, {}, True)

    assert load(opts).loaded == 0  # nothing there yet
    kept = load(opts)
    assert kept.stem == str(directory / saved.name.rsplit("-", 1)[0])  # the same key as the first process's
    shutil.copy(saved, f"{kept.stem}-0.pt")
    assert load(opts).loaded == 1  # the real thing loads: the checks below are what rejects the others

    no_halves = dataclasses.replace(opts, rope_halves=False)
    planted = f"{load(no_halves).stem}-0.pt"
    shutil.copy(saved, planted)  # a graph for RoPE over head halves, named as one for neighbouring pairs
    assert load(no_halves).loaded == 0 and not os.path.exists(planted)
    assert "made for another key: options" in capsys.readouterr().err

    with open(f"{kept.stem}-0.pt", "r+b") as f:
        f.truncate(1000)
    assert load(opts).loaded == 0 and not os.path.exists(f"{kept.stem}-0.pt")
    assert "not used" in capsys.readouterr().err

    edited = tmp_path / "edited"
    edited.mkdir()
    for name in precompile.TRACED_SOURCES:
        shutil.copy(os.path.join(REPO_ROOT, name), edited / name)
    with open(edited / "optimized_inference.py", "a") as f:
        f.write("# an edit\n")
    shutil.copy(saved, f"{kept.stem}-0.pt")
    monkeypatch.setattr(precompile, "HERE", str(edited))
    assert load(opts).stem != kept.stem and load(opts).loaded == 0


@torch.no_grad()
def test_a_block_kind_torch_cannot_save_is_compiled_by_dynamo(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """Where torch's ahead-of-time compile fails (a guard or an object that this torch cannot serialize), the block
    kind goes to dynamo's compile instead, unsaved, with one warning. torch.compile is a stand-in here: no compile."""
    class Unsavable:
        def __init__(self, fn, **options):
            self.fn = fn

        def aot_compile(self, example_inputs):
            raise RuntimeError("cannot serialize this guard")

        def __call__(self, *args):
            return self.fn(*args)

    opts = compiled_on()
    block = opt.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts).transformer.single_transformer_blocks[0]
    monkeypatch.setattr(torch, "compile", Unsavable)
    kind = precompile.PrecompiledBlocks(block, str(tmp_path), opts, {}, True)
    x, mod, cos, sin = torch.randn(1, 20, 32), torch.randn(1, 96), torch.randn(20, 16), torch.randn(20, 16)
    for _ in range(2):
        assert torch.equal(kind(block, x, mod, (cos, sin)), block.forward(x, mod, (cos, sin)))
    assert capsys.readouterr().err.count("cannot be precompiled (RuntimeError: cannot serialize this guard)") == 1
    assert isinstance(kind.dynamo, Unsavable) and kind.compiled == 0 and os.listdir(tmp_path) == []
