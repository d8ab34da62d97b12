"""Helpers shared by the test files: the tiny configuration, error measures, PNG reading, CLI runners, bad input."""

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny transformer that the model-level tests build (the tiny pipeline on disk has its own, tiny_pipeline.py).
TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
# One request on the tiny pipeline: non-square, a multiple of 8 (its VAE's scale factor 4 times the 2x2 packing).
PROMPT = "A photo of a cat sitting on a red chair in the warm morning light"
HEIGHT, WIDTH, STEPS, GUIDANCE, SEED, MAX_SEQ = 40, 56, 3, 3.5, 7, 48


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical); written here independently of
    fp8.psnr, which tests/test_fp8.py checks against scikit-image's numbers."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def cli_args(model_dir: str, output: str, *extra: str, dtype: str = "float32") -> list[str]:
    """Both scripts' flags for the tiny request, then `extra` (a later flag overrides an earlier one's value)."""
    return with_flags(["--prompt", PROMPT, "--model", model_dir, "--device", "cpu", "--dtype", dtype,
                       "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS),
                       "--guidance", str(GUIDANCE), "--max-sequence-length", str(MAX_SEQ), "--seed", str(SEED),
                       "--output", output], list(extra))


def with_flags(args: list[str], extra: list[str]) -> list[str]:
    """`args` with each flag of `extra` replacing that flag's value, or appended (with its value if it takes one)."""
    args, i = list(args), 0
    while i < len(extra):
        flag = extra[i]
        takes_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if flag in args and takes_value:
            args[args.index(flag) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 1 + takes_value]
        i += 1 + takes_value
    return args


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """A script as a user runs it, in a process of its own (for what only a real process shows)."""
    return subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def assert_clean_error(code: int, err: str, *needles: str) -> str:
    """Exit status 2 and exactly one `error:` line, the last on stderr, naming every needle; returns that line.

    In process, a traceback is an exception escaping main(), which fails the test before this runs; run_script's
    callers check stderr for one too (library warnings and progress bars before the error are tolerated)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def check_bad_input(main, args: list[str], needles: list[str], out_dir, capsys) -> str:
    """main(args) in process: one clean error line naming `needles`, and nothing written to out_dir."""
    capsys.readouterr()
    code = main(args)
    line = assert_clean_error(code, capsys.readouterr().err, *needles)
    assert os.listdir(out_dir) == [], "nothing may be written on bad input"
    return line
