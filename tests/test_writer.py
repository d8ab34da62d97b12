"""--prompts-file's writer thread (prompts_file.generate_many): the PNGs of a batch are written while the next batch
runs, a failed write stops the run, and every image made is written whole before generate_many returns or raises.

generate and save_png are replaced by fakes that sleep, so these tests time the overlap without a model."""

import os
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import optimized_inference as opt
import prompts_file
from tests.helpers import read_png

DEFAULTS = dict(prompt_2=None, seed=10, height=16, width=24, steps=2, guidance=3.5, lora=())
# All that generate_many reads of a pipeline besides what it hands to generate.
PIPE = SimpleNamespace(transformer=None, seen={"t5_tokens": 48}, device=torch.device("cpu"))


def image_of(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (DEFAULTS["height"], DEFAULTS["width"], 3), dtype=np.uint8)


@pytest.fixture
def fakes(monkeypatch):
    """generate takes generate_s a batch and draws each seed's image_of; save_png takes write_s an image, then writes
    (or, for a file named in `fail`, raises save_png's UserError). Returns those settings and the seeds generated."""
    fake = SimpleNamespace(generate_s=0.3, write_s=0.3, fail={}, generated=[])

    def generate(pipe, req, timer):
        time.sleep(fake.generate_s)
        fake.generated.extend(req.seeds)
        return np.stack([image_of(seed) for seed in req.seeds])

    def save_png(image, path, metadata):
        time.sleep(fake.write_s)
        if os.path.basename(path) in fake.fail:
            raise opt.UserError(f"cannot write {path}: {fake.fail[os.path.basename(path)]}")
        opt.save_png(image, path, metadata)

    monkeypatch.setattr(prompts_file, "generate", generate)
    monkeypatch.setattr(prompts_file, "save_png", save_png)
    return fake


def jobs(n: int) -> list[prompts_file.Job]:
    return [prompts_file.parse_job(f"a red cat {i}", i, DEFAULTS, 8) for i in range(n)]


def assert_whole(out, seeds):
    """The folder holds exactly these seeds' images, each the one generated, and no .tmp."""
    assert sorted(os.listdir(out)) == [f"{i:04d}-{10 + i}.png" for i in range(len(seeds))]
    for i, seed in enumerate(seeds):
        assert np.array_equal(read_png(out / f"{i:04d}-{seed}.png"), image_of(seed))


def test_writes_overlap_the_next_batch_and_are_done_on_return(fakes, tmp_path, capsys):
    """4 batches of one image: about 4 generations and one last write (1.5 s), not 4 of each (2.4 s) as when each
    batch waits for its own PNG; the throughput line's total includes the wait for that last write."""
    t0 = time.perf_counter()
    prompts_file.generate_many(PIPE, jobs(4), 1, 48, str(tmp_path / "out"), {})
    elapsed = time.perf_counter() - t0
    assert_whole(tmp_path / "out", [10, 11, 12, 13])  # the last one too: generate_many waited for it
    assert 1.5 <= elapsed < 1.95, elapsed
    total = float(re.search(r"4 images in ([\d.]+)s", capsys.readouterr().out).group(1))
    assert 1.4 <= total <= elapsed + 0.05, (total, elapsed)  # 1.2 s if the last write's wait were left out


def test_failed_write_stops_the_run_at_the_batch_it_overlapped(fakes, tmp_path):
    """The second image cannot be written: its UserError is raised at the end of the third batch (its write, 0.1 s,
    ran during that batch's 0.3 s), not after all six; the first image is whole."""
    fakes.write_s, fakes.fail["0001-11.png"] = 0.1, "No space left on device"
    with pytest.raises(opt.UserError, match=r"cannot write .*0001-11.png: No space left on device"):
        prompts_file.generate_many(PIPE, jobs(6), 1, 48, str(tmp_path / "out"), {})
    assert fakes.generated in ([10, 11, 12], [10, 11])  # the second only if the main thread stalled for 0.1 s
    names = sorted(os.listdir(tmp_path / "out"))
    assert names[0] == "0000-10.png" and "0001-11.png" not in names and not any(n.endswith(".tmp") for n in names)
    assert np.array_equal(read_png(tmp_path / "out" / "0000-10.png"), image_of(10))


def test_interrupt_still_writes_the_images_made(fakes, tmp_path, monkeypatch):
    """Ctrl-C (or a later batch's out-of-memory error) during the third batch: the two images made before it, the
    second still being written, are written whole before the exception goes on up."""
    generate = prompts_file.generate

    def interrupted(pipe, req, timer):
        if req.seeds == [12]:
            raise KeyboardInterrupt
        return generate(pipe, req, timer)

    monkeypatch.setattr(prompts_file, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prompts_file.generate_many(PIPE, jobs(4), 1, 48, str(tmp_path / "out"), {})
    assert_whole(tmp_path / "out", [10, 11])


def test_cli_reports_a_failed_write_in_one_line(tiny_pipeline_dir, tmp_path, capsys):
    """A real failure, no fakes: a folder in the way of the second image. The CLI's one-line error and exit status 2,
    the first image whole, no .tmp left."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red cat\na blue dog\na tall tree\n")
    (out / "0001-4.png").mkdir(parents=True)
    assert opt.main(["--model", tiny_pipeline_dir, "--prompts-file", str(prompts), "--steps", "2", "--seed", "3",
                     "--height", "40", "--width", "56", "--output-dir", str(out), "--device", "cpu", "--dtype",
                     "float32", "--max-sequence-length", "48", "--no-text-buckets"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: cannot write .*0001-4\.png: .*$", err, re.M) and "Traceback" not in err
    assert read_png(out / "0000-3.png").shape == (40, 56, 3)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
