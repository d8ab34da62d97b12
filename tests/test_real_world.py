"""Many prompts, many shapes, BFL single-file checkpoints, the graph cache (optimized_inference.py, CPU)."""

import importlib
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import bfl_checkpoint
import optimized_inference as opt
import prompts_file
from tests.helpers import max_pixel_diff, read_png

DEFAULTS = dict(prompt_2=None, seed=10, height=40, width=56, steps=2, guidance=3.5, lora=())
TINY_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-sequence-length", "48", "--no-text-buckets"]


def test_parse_job_plain_and_json():
    job = prompts_file.parse_job("a red cat", 3, DEFAULTS, 8)
    assert (job.prompt, job.prompt_2, job.seed, job.height, job.steps) == ("a red cat", "a red cat", 13, 40, 2)
    line = json.dumps({"prompt": "a dog", "seed": 1, "height": 64, "guidance": 2})
    job = prompts_file.parse_job(line, 0, DEFAULTS, 8)
    assert (job.seed, job.height, job.width, job.guidance) == (1, 64, 56, 2)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "x", "colour": 1}', "unknown field(s) colour"),
    ('{"prompt": "x"', "not valid JSON"),
    ('{"prompt": "x", "height": 44}', "height must be a multiple of 8"),
    ('{"prompt": "x", "width": 4096}', "up to 2048"),
    ('{"prompt": "x", "steps": 0}', "steps must be positive"),
    ('{"prompt": "x", "seed": "7"}', "seed must be an integer"),
    ('{"prompt": "x", "guidance": -1}', "guidance must be a finite number >= 0"),
    ('{"prompt": "x", "guidance": NaN}', "guidance must be a finite number >= 0, got nan"),
    (f'{{"prompt": "x", "seed": {2**64}}}', "seed must be 0 to 2**64 - 1"),
    ('{"prompt": "x", "seed": -1}', "seed must be 0 to 2**64 - 1"),
    ('{"prompt": "  "}', "empty prompt"),
    ('{"prompt": "x", "lora": "style.safetensors"}', "lora must be a list of [file, scale] pairs"),
    ('{"prompt": "x", "lora": [["style.safetensors"]]}', "lora must be a list of [file, scale] pairs"),
])
def test_parse_job_rejects(line, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prompts_file.parse_job(line, 0, DEFAULTS, 8)


def test_read_prompts_file_skips_bad_lines_with_their_numbers(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('a\n\n# comment\n{"prompt": "b", "height": 44}\n{"prompt": "c", "seed": 3}\n')
    jobs = prompts_file.read_prompts_file(str(path), DEFAULTS, 8, strict=False)
    assert [(j.prompt, j.index, j.seed) for j in jobs] == [("a", 0, 10), ("c", 1, 3)]
    assert f"{path}:4: height must be a multiple of 8" in capsys.readouterr().err
    with pytest.raises(opt.UserError, match=r"1 bad line.*:4:.*--strict"):
        prompts_file.read_prompts_file(str(path), DEFAULTS, 8, strict=True)


def test_batches_group_consecutive_jobs_of_one_shape():
    jobs = [prompts_file.parse_job(line, i, DEFAULTS, 8) for i, line in enumerate(
        ["a", "b", "c", '{"prompt": "d", "height": 64}', '{"prompt": "e", "height": 64}', "f"])]
    assert [[j.prompt for j in b] for b in prompts_file.batches(jobs, 2)] == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert [len(b) for b in prompts_file.batches(jobs, 1)] == [1] * 6


def test_throughput_counts_each_shapes_first_batch_as_warm_up():
    one, two = (1, 1024, 1024, 512), (1, 768, 1360, 512)
    line = prompts_file.throughput([(one, 1, 40.0), (one, 1, 4.0), (two, 1, 9.0), (one, 1, 4.0), (two, 1, 4.0)])
    assert line.startswith("5 images in 61.0s: warm-up 49.0s (the first batch of each of 2 shapes")
    assert line.endswith("then 3 images at 900 images/hour")  # 3 images in 12 s
    assert "no steady-state rate" in prompts_file.throughput([(one, 1, 40.0), (two, 1, 9.0)])
    assert prompts_file.throughput([((2, 64, 64, 128), 2, 30.0), ((2, 64, 64, 128), 2, 2.0)]).endswith(
        "then 2 images at 3600 images/hour")


def test_prompts_file_batched_equals_one_by_one(tiny_pipeline_dir, tmp_path, capsys):
    """Images from a batched forward are the images each prompt and seed gives alone; bad lines are skipped."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red cat\n{"prompt": "a blue dog", "seed": 5}\n{"prompt": "bad", "width": 50}\n'
                       '{"prompt": "a tall tree", "height": 64, "width": 48}\n')
    args = ["--model", tiny_pipeline_dir, "--prompts-file", str(prompts), "--steps", "2", "--seed", "3",
            "--height", "40", "--width", "56", *TINY_ARGS]
    assert opt.main([*args, "--batch-size", "2", "--output-dir", str(tmp_path / "b2")]) == 0
    out = capsys.readouterr()
    assert ":3: width must be a multiple of 8" in out.err and "3 images in" in out.out and "2 shapes" in out.out
    assert sorted(os.listdir(tmp_path / "b2")) == ["0000-3.png", "0001-5.png", "0002-5.png"]
    for name in ("0000-3.png", "0001-5.png"):
        alone = tmp_path / f"alone-{name}"
        prompt = "a red cat" if name.startswith("0000") else "a blue dog"
        assert opt.main(["--model", tiny_pipeline_dir, "--prompt", prompt, "--seed", name[5], "--steps", "2",
                         "--height", "40", "--width", "56", "--output", str(alone), *TINY_ARGS]) == 0
        assert max_pixel_diff(read_png(tmp_path / "b2" / name), read_png(alone)) <= 1
    assert Image.open(tmp_path / "b2" / "0002-5.png").size == (48, 64)
    meta = Image.open(tmp_path / "b2" / "0001-5.png").text
    assert (meta["prompt"], meta["seed"], meta["size"]) == ("a blue dog", "5", "56x40")


def test_strict_prompts_file_generates_nothing(tiny_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red cat\n{"prompt": "x", "colour": 1}\n')
    args = ["--model", tiny_pipeline_dir, "--prompts-file", str(prompts), "--strict", *TINY_ARGS]
    assert opt.main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    assert "error: 1 bad line" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_step_cache_is_bounded_lru(tiny_pipeline_dir):
    opts = opt.effective_options(opt.Options(text_buckets=False), torch.device("cpu"))
    pipe = opt.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts)
    pipe.max_steps = 2
    shapes = [(40, 56), (48, 64), (40, 56), (64, 64)]
    for height, width in shapes:
        opt.generate(pipe, opt.Request(["a cat"], ["a cat"], height, width, 1, 3.5, [0], 32), opt.Timer(pipe.device))
    latent_tokens = [key[0][1] for key in pipe.steps]  # least recently used first
    assert latent_tokens == [(40 // 8) * (56 // 8), (64 // 8) * (64 // 8)]


# diffusers' names -> Black Forest Labs' names, written independently of optimized_inference's own table.
TO_BFL = [
    (r"x_embedder", "img_in"), (r"context_embedder", "txt_in"),
    (r"time_text_embed\.timestep_embedder\.linear_(\d)", lambda m: f"time_in.{('in', 'out')[int(m[1]) - 1]}_layer"),
    (r"time_text_embed\.guidance_embedder\.linear_(\d)", lambda m: f"guidance_in.{('in', 'out')[int(m[1]) - 1]}_layer"),
    (r"time_text_embed\.text_embedder\.linear_(\d)", lambda m: f"vector_in.{('in', 'out')[int(m[1]) - 1]}_layer"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q", r"double_blocks.\1.img_attn.norm.query_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k", r"double_blocks.\1.img_attn.norm.key_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q", r"double_blocks.\1.txt_attn.norm.query_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k", r"double_blocks.\1.txt_attn.norm.key_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2"),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q", r"single_blocks.\1.norm.query_norm"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k", r"single_blocks.\1.norm.key_norm"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2"),
    (r"proj_out", "final_layer.linear"), (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),
]


def to_bfl(state: dict) -> dict:
    """A diffusers FLUX transformer state dict in Black Forest Labs' single-file layout."""
    out, state = {}, dict(state)
    for prefix, parts, bfl in [(r"transformer_blocks\.(\d+)\.attn\.", ("to_q", "to_k", "to_v"), "img_attn.qkv"),
                               (r"transformer_blocks\.(\d+)\.attn\.", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                "txt_attn.qkv"),
                               (r"single_transformer_blocks\.(\d+)\.", ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                        "proj_mlp"), "linear1")]:
        for key in [k for k in state if re.fullmatch(prefix + re.escape(parts[0]) + r"\.weight", k)]:
            n, head = re.match(prefix, key)[1], key[: re.match(prefix, key).end()]
            kind = "double_blocks" if bfl != "linear1" else "single_blocks"
            for suffix in ("weight", "bias"):
                out[f"{kind}.{n}.{bfl}.{suffix}"] = torch.cat([state.pop(f"{head}{p}.{suffix}") for p in parts])
    for key, tensor in state.items():
        stem, kind = key.rsplit(".", 1)
        for pattern, target in TO_BFL:
            if re.fullmatch(pattern, stem):
                if stem == "norm_out.linear":
                    tensor = torch.cat(tensor.chunk(2)[::-1])
                new = re.sub(pattern, target, stem)
                out[f"{new}.{'scale' if new.endswith(('query_norm', 'key_norm')) else kind}"] = tensor
                break
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


def test_bfl_single_file_checkpoint_gives_the_same_image(tiny_pipeline_dir, tmp_path):
    diffusers_state = load_file(os.path.join(tiny_pipeline_dir, "transformer",
                                             "diffusion_pytorch_model.safetensors"))
    bfl_state = to_bfl(diffusers_state)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl_state and "single_blocks.1.linear1.weight" in bfl_state
    checkpoint = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_state, str(checkpoint))
    for fused in ([], ["--no-fused-qkv"]):
        common = ["--prompt", "a lighthouse", "--steps", "2", "--height", "40", "--width", "56", *TINY_ARGS, *fused]
        assert opt.main(["--model", tiny_pipeline_dir, *common, "--output", str(tmp_path / "dir.png")]) == 0
        assert opt.main(["--model", str(checkpoint), "--text-encoders-from", tiny_pipeline_dir, *common,
                         "--output", str(tmp_path / "bfl.png")]) == 0
        assert np.array_equal(read_png(tmp_path / "dir.png"), read_png(tmp_path / "bfl.png"))
    config = json.load(open(os.path.join(tiny_pipeline_dir, "transformer", "config.json")))
    cfg = bfl_checkpoint.config_from_bfl(bfl_state, {})
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.guidance_embeds) == (
        config["num_layers"], config["num_single_layers"], config["num_attention_heads"], config["guidance_embeds"])


def test_bfl_checkpoint_errors(tiny_pipeline_dir, tmp_path, capsys):
    checkpoint = tmp_path / "flux1-tiny.safetensors"
    save_file({"img_in.weight": torch.randn(4, 4)}, str(checkpoint))
    args = ["--prompt", "x", *TINY_ARGS]
    assert opt.main(["--model", str(checkpoint), *args]) == 2
    assert "needs --text-encoders-from" in capsys.readouterr().err
    assert opt.main(["--model", str(checkpoint), "--text-encoders-from", tiny_pipeline_dir, *args]) == 2
    assert "not a FLUX transformer checkpoint in Black Forest Labs' layout" in capsys.readouterr().err
    assert opt.main(["--model", str(tmp_path / "missing.safetensors"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_compile_cache_falls_back_with_a_warning(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for name in ("pycache_prefix", "dont_write_bytecode"):  # restored after: PYTHONDONTWRITEBYTECODE may be set
        monkeypatch.setattr(sys, name, getattr(sys, name))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    prompts_file.use_compile_cache(str(blocker / "cache"))
    assert "warning: no compile cache" in capsys.readouterr().err
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "before")
    prompts_file.use_compile_cache(str(tmp_path / "cache"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()


def test_compile_cache_keeps_bytecode_where_the_environment_writes_none(tmp_path, monkeypatch):
    """PYTHONDONTWRITEBYTECODE set: --compile-cache keeps the bytecode of what is imported after it (~10 s of a warm
    start on BENCHMARKS.md's GPU, run 44); where Python writes bytecode anyway, its places are left as they are."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "module_for_the_pycache_test.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    prompts_file.use_compile_cache(str(tmp_path / "writes"))
    assert sys.pycache_prefix is None and not sys.dont_write_bytecode
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    prompts_file.use_compile_cache(str(tmp_path / "cache"))
    assert not sys.dont_write_bytecode and sys.pycache_prefix == str(tmp_path / "cache" / "pycache")
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "module_for_the_pycache_test", raising=False)
    assert importlib.import_module("module_for_the_pycache_test").X == 1
    assert list((tmp_path / "cache" / "pycache").rglob("module_for_the_pycache_test.*.pyc"))


@torch.no_grad()
def test_offloaded_text_encoders_encode_the_same_and_stay_off_the_device(tiny_pipeline_dir):
    opts = opt.effective_options(opt.Options(), torch.device("cpu"))
    plain = opt.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts)
    offloaded = opt.load_pipeline(tiny_pipeline_dir, "cpu", torch.float32, opts, offload_text_encoders=True)
    # Sequential offload: the modules hold no weights; a CPU copy is streamed in layer by layer per forward.
    for encoder in (offloaded.clip, offloaded.t5):
        assert {p.device.type for p in encoder.parameters()} == {"meta"}
    prompts = ["a lighthouse on a cliff", "two cats"]
    txt, pooled = opt.encode_prompt(plain, prompts, prompts, 32)
    txt_off, pooled_off = opt.encode_prompt(offloaded, prompts, prompts, 32)
    assert txt.std() > 0 and torch.equal(txt, txt_off) and torch.equal(pooled, pooled_off)


def test_prompts_file_resumes_and_overwrite_redoes(tiny_pipeline_dir, tmp_path, capsys):
    """A rerun into the same folder makes only what is missing, cut short, or from a changed line."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red cat\na blue dog\na tall tree\n")
    args = ["--model", tiny_pipeline_dir, "--prompts-file", str(prompts), "--steps", "2", "--seed", "3",
            "--height", "40", "--width", "56", "--output-dir", str(out), *TINY_ARGS]
    assert opt.main(args) == 0
    names = sorted(os.listdir(out))
    assert names == ["0000-3.png", "0001-4.png", "0002-5.png"]
    first = {n: read_png(out / n) for n in names}
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    data = (out / names[1]).read_bytes()
    (out / names[1]).write_bytes(data[: len(data) // 2])  # cut short, as a full disk or a broken copy leaves it
    prompts.write_text("a red cat\na blue dog\na tall oak tree\n")  # the third line changed
    capsys.readouterr()
    assert opt.main(args) == 0
    stdout = capsys.readouterr().out
    assert "1 of 3 images are already in" in stdout and "2 images in" in stdout
    assert os.stat(out / names[0]).st_mtime_ns == stamps[names[0]]
    assert np.array_equal(read_png(out / names[1]), first[names[1]])  # made again, the same image
    assert Image.open(out / names[2]).text["prompt"] == "a tall oak tree"
    assert opt.main([*args, "--overwrite"]) == 0
    assert "3 images in" in capsys.readouterr().out
