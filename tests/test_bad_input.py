"""Bad input, tried as a new user would, on both scripts and on benchmark.py where it takes the same flags: one line on
stderr that starts with `error: ` and names the input, exit status 2, nothing written (tests/helpers.py). In process,
but for one case per script run as a user runs it."""

import logging
import os
from collections import namedtuple

import pytest
import torch
from transformers import CLIPTokenizer, T5TokenizerFast

import benchmark
import optimized_inference as oi
import single_file_inference as sfi
from tests.helpers import MAX_SEQ, assert_clean_error, check_bad_input, cli_args, run_script, with_flags

MODULES = {"ref": sfi, "opt": oi}
MAINS = {"ref": sfi.main, "opt": oi.main, "bench": benchmark.main}
SCRIPTS = {"ref": "single_file_inference.py", "opt": "optimized_inference.py"}
BOTH, ALL, OPT = ("ref", "opt"), ("ref", "opt", "bench"), ("opt",)

# flags: over the good tiny request (helpers.cli_args; for bench, a --model and an --out-dir); needles: what the error
# line must hold; scripts: where the case applies; raises: what denoising raises instead of running.
# In flags and needles, {tmp} is the test's folder, {out} the output folder that must stay empty, {tiny} the tiny
# pipeline and {<name>} a copy of it broken as conftest.broken_model_dirs says.
Case = namedtuple("Case", "flags needles scripts raises", defaults=(BOTH, None))
GPU_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
CPU_OOM = RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 80000000000 bytes.")
MEMORY = ["1 image(s) of 56x40", "a smaller --height/--width or --batch-size"]
CASES = {
    # The request: checked before anything is loaded (sizes that are not multiples of 8 need the VAE's config)
    "height-not-multiple-of-8": Case(["--height", "44"], ["multiples of 8", "44"]),
    "width-not-multiple-of-8": Case(["--width", "60"], ["multiples of 8", "60"]),
    "height-zero": Case(["--height", "0"], ["--height/--width", "0x56"], ALL),
    "width-negative": Case(["--width", "-16"], ["-16"], ALL),
    "size-overflows-the-schedule": Case(["--height", "100000", "--width", "100000"], ["2048", "100000x100000"], ALL),
    "height-takes-minutes": Case(["--height", "100000", "--width", "96"], ["2048", "100000x96"], ALL),
    "steps-zero": Case(["--steps", "0"], ["--steps"], ALL),
    "guidance-negative": Case(["--guidance", "-1"], ["--guidance"], ALL),
    "guidance-nan": Case(["--guidance", "nan"], ["--guidance", "finite", "nan"], ALL),
    "guidance-inf": Case(["--guidance", "inf"], ["--guidance", "finite", "inf"], ALL),
    "seed-past-64-bits": Case(["--seed", str(2**70)], ["--seed", str(2**70)], ALL),
    "seed-negative": Case(["--seed", "-1"], ["--seed", "-1"], ALL),
    "seed-of-the-batch-past-64-bits": Case(["--seed", str(2**64 - 1), "--batch-size", "2"], ["--seed"], ALL),
    "max-sequence-length-zero": Case(["--max-sequence-length", "0"], ["--max-sequence-length"], ALL),
    "max-sequence-length-past-t5": Case(["--max-sequence-length", "100000"], ["512", "100000"], ALL),
    "batch-size-zero": Case(["--batch-size", "0"], ["--batch-size"], ALL),
    "prompt-empty": Case(["--prompt", ""], ["--prompt"]),
    "prompt-blank": Case(["--prompt", "   "], ["--prompt"]),
    # Where it runs
    "device-bogus": Case(["--device", "bogus"], ["--device 'bogus'", "cpu, cuda"], ALL),
    "device-mps": Case(["--device", "mps"], ["--device 'mps'"], ALL),
    "device-meta": Case(["--device", "meta"], ["--device 'meta'"], ALL),
    "device-cuda-without-cuda": Case(["--device", "cuda"], ["--device cuda", "CUDA"], ALL),
    "device-cuda-index-past-the-gpus": Case(["--device", "cuda:99"], ["--device cuda:99", "CUDA device(s)"], ALL),
    "random-weights-on-cpu": Case(["--random-weights"], ["--random-weights", "GPU", "python tiny_pipeline.py"], ALL),
    # What it writes: checked before anything is loaded
    "output-jpg": Case(["--output", "{out}/out.jpg"], ["--output {out}/out.jpg", ".png"]),
    "output-without-extension": Case(["--output", "{out}/out"], ["--output {out}/out", ".png"]),
    "output-in-missing-directory": Case(["--output", "{tmp}/no/such/dir/out.png"], ["no/such/dir"]),
    "output-is-a-directory": Case(["--output", "{tmp}/folder.png"], ["{tmp}/folder.png", "is a directory"]),
    "output-unwritable": Case(["--output", "/proc/out.png"], ["/proc/out.png", "not a writable directory"]),
    "timings-json-in-missing-directory": Case(["--timings-json", "{tmp}/no/such/dir/t.json"], ["no/such/dir"]),
    "timings-json-unwritable": Case(["--timings-json", "/proc/t.json"], ["/proc/t.json", "not a writable"]),
    # What it loads: the damaged file or folder is named
    "model-does-not-exist": Case(["--model", "{tmp}/does_not_exist"], ["does_not_exist"]),
    "model-missing-vae": Case(["--model", "{no_vae}"], ["vae"]),
    "model-missing-transformer-config": Case(["--model", "{no_transformer_config}"], ["transformer", "config.json"]),
    "transformer-renamed-key": Case(["--model", "{renamed_key}"], [  # the optimized script names to_k fused, to_qkv
        "{renamed_key}/transformer does not match its config", "transformer_blocks.1.attn.to_key.weight"]),
    "transformer-truncated": Case(["--model", "{truncated}"], [
        "{truncated}/transformer/diffusion_pytorch_model.safetensors", "fetch it again"]),
    "transformer-empty": Case(["--model", "{empty}"], ["{empty}/transformer/diffusion_pytorch_model.safetensors"]),
    "transformer-random-bytes": Case(["--model", "{garbage}"], [
        "{garbage}/transformer/diffusion_pytorch_model.safetensors"]),
    "t5-truncated": Case(["--model", "{truncated_t5}"], ["cannot load {truncated_t5}/text_encoder_2"]),
    "t5-tokenizer-random-bytes": Case(["--model", "{garbage_t5_tokenizer}"], [
        "cannot load {garbage_t5_tokenizer}/tokenizer_2"]),
    # Out of memory: what was asked for and what takes less
    "out-of-gpu-memory": Case([], ["out of GPU memory", *MEMORY], raises=GPU_OOM),
    "out-of-cpu-memory": Case([], ["out of CPU memory", *MEMORY], raises=CPU_OOM),
    "memory-error": Case([], ["out of CPU memory", *MEMORY], raises=MemoryError()),
    # The optimized script's own flags
    "out-of-memory-names-the-options": Case([], ["--offload-text-encoders, --quantize fp8"], OPT, GPU_OOM),
    "attention-cudnn-on-cpu": Case(["--attention", "cudnn"], ["--attention cudnn", "CUDA"], OPT),
    "attention-fa3-on-cpu": Case(["--attention", "fa3"], ["--attention fa3", "CUDA"], OPT),
    "attention-cudnn-fp8-on-cpu": Case(["--attention", "cudnn-fp8"], ["--attention cudnn-fp8", "CUDA"], OPT),
    "inductor-tuning-without-compile": Case(["--inductor-tuning", "--no-compile"], ["--inductor-tuning"], OPT),
    "profile-in-missing-directory": Case(["--profile", "{tmp}/no/such/dir/p.json"], ["no/such/dir"], OPT),
    "compare-bf16-without-fp8": Case(["--compare-bf16"], ["--compare-bf16", "it needs --quantize fp8"], OPT),
    "fp8-keep-bf16-without-fp8": Case(["--fp8-keep-bf16", "1"], ["--fp8-keep-bf16 needs --quantize fp8"], OPT),
    "fp8-keep-bf16-negative": Case(["--quantize", "fp8", "--fp8-keep-bf16", "-1"], ["--fp8-keep-bf16 must be >= 0"],
                                   OPT),
    "fp8-in-float32": Case(["--quantize", "fp8"], ["--quantize fp8", "not --dtype float32"], OPT),
    "bfl-checkpoint-random-bytes": Case([
        "--model", "{garbage}/transformer/diffusion_pytorch_model.safetensors", "--text-encoders-from", "{tiny}"],
        ["{garbage}/transformer/diffusion_pytorch_model.safetensors"], OPT),
    "output-dir-without-prompts-file": Case(["--output-dir", "{tmp}/o"], ["--output-dir", "--prompts-file"], OPT),
    "strict-without-prompts-file": Case(["--strict"], ["--strict", "--prompts-file"], OPT),
    "overwrite-without-prompts-file": Case(["--overwrite"], ["--overwrite", "--prompts-file"], OPT),
    "output-with-prompts-file": Case(["--prompts-file", "{tmp}/p.txt"], ["--output is not used with --prompts-file"],
                                     OPT),
    "runs-with-prompts-file": Case(["--prompts-file", "{tmp}/p.txt", "--output", "output.png", "--runs", "3"],
                                   ["--runs is not used with --prompts-file"], OPT),
    "compare-bf16-with-prompts-file": Case(["--quantize", "fp8", "--compare-bf16", "--prompts-file", "{tmp}/p.txt"],
                                           ["--output, --compare-bf16 are not used with --prompts-file"], OPT),
    "prompts-file-missing": Case(["--prompts-file", "{tmp}/missing.txt", "--output", "output.png"],
                                 ["cannot read {tmp}/missing.txt"], OPT),
    "out-of-memory-in-a-prompts-file": Case(["--prompts-file", "{tmp}/p.txt", "--output", "output.png", "--output-dir",
                                             "{out}/images"], ["1 image(s) of 48x64"], OPT, GPU_OOM),
    "output-dir-unwritable": Case(["--prompts-file", "{tmp}/p.txt", "--output", "output.png", "--output-dir",
                                   "/proc/flux/images"], ["cannot write images into /proc/flux/images"], OPT),
}


@pytest.mark.parametrize("script,name", [pytest.param(script, name, id=f"{script}-{name}")
                                         for name, case in CASES.items() for script in case.scripts])
def test_bad_input_is_one_line_error(script, name, tiny_pipeline_dir, broken_model_dirs, tmp_path, capsys,
                                     monkeypatch):
    case = CASES[name]
    if name == "device-cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "folder.png").mkdir()
    fill = lambda text: text.format(tmp=tmp_path, out=out, tiny=tiny_pipeline_dir, **broken_model_dirs)  # noqa: E731
    if script == "bench":
        args = ["--model", tiny_pipeline_dir, "--device", "cpu", "--height", "40", "--width", "56", "--configs",
                "reference", "--out-dir", str(out)]
    else:
        args = cli_args(tiny_pipeline_dir, str(out / "out.png"))
    if "--prompts-file" in case.flags:  # a prompts file instead of --prompt
        (tmp_path / "p.txt").write_text('{"prompt": "a red cat", "height": 64, "width": 48}\n')
        args = args[2:]
    if case.raises is not None:
        def denoise(*args, **kwargs):
            raise case.raises

        monkeypatch.setattr(MODULES[script], "denoise", denoise)
    check_bad_input(MAINS[script], with_flags(args, [fill(a) for a in case.flags]), [fill(n) for n in case.needles],
                    out, capsys)
    made_here = {"out", "folder.png"} | ({"p.txt"} if "--prompts-file" in case.flags else set())
    assert set(os.listdir(tmp_path)) == made_here  # nothing beside `out` either: no temporary file, no images folder


@pytest.mark.parametrize("script", BOTH)
def test_other_errors_are_not_hidden(script, tiny_pipeline_dir, tmp_path, monkeypatch):
    """Only out of memory becomes an error line: any other RuntimeError is a bug, and keeps its traceback."""
    def denoise(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(MODULES[script], "denoise", denoise)
    with pytest.raises(RuntimeError, match="a bug"):
        MAINS[script](cli_args(tiny_pipeline_dir, str(tmp_path / "out.png")))


@pytest.mark.parametrize("script", BOTH)
def test_long_prompt_warns_once_without_library_noise(script, tiny_pipeline_dir, tmp_path, capsys):
    """A 5,000-word prompt over a warm-up and two timed runs: each of our truncation warnings once, and not
    transformers' own "Token indices sequence length is longer than ..." (our line says more)."""
    prompt = " ".join(["word"] * 5000)
    clip_tokens = len(CLIPTokenizer.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer")(prompt).input_ids)
    t5_tokens = len(T5TokenizerFast.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer_2")(prompt).input_ids)
    library = []  # transformers logs through its own handler, which capsys does not see
    handler = logging.Handler()
    handler.emit = library.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        runs = ["--warmup", "1", "--runs", "2"]
        assert MAINS[script](cli_args(tiny_pipeline_dir, str(tmp_path / "out.png"), "--prompt", prompt, *runs)) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")] == [
        f"warning: prompt longer than CLIP's 77 tokens; {clip_tokens - 77} tokens were dropped",
        f"warning: prompt longer than T5's {MAX_SEQ} tokens; {t5_tokens - MAX_SEQ} tokens were dropped"]
    assert not [r.getMessage() for r in library if "sequence length" in r.getMessage()]


@pytest.mark.parametrize("script", BOTH)
def test_bad_input_as_a_user_runs_it(script, tmp_path):
    """In a process of its own, for what only a real process shows (noise printed at import, the exit status): the
    issue's --random-weights on a CPU, as a new user would try it."""
    proc = run_script(SCRIPTS[script], ["--prompt", "a cat", "--random-weights", "--device", "cpu",
                                        "--output", str(tmp_path / "out.png")])
    line = assert_clean_error(proc.returncode, proc.stderr, "--random-weights", "python tiny_pipeline.py")
    assert proc.stderr.strip().splitlines() == [line]
    assert os.listdir(tmp_path) == []
