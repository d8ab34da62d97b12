#!/usr/bin/env bash
# One device session: install carried wheels, run the GPU tests, time the scripts. Logs go to $OUT (or ./gpu-out).
# Usage: bash gpu_checks.sh [tests] [reference] [optimized] [prompts] [ttfi] [offload] [fp8-error] [batch] [parallel]
#        [mixed] [deferred-vae] [sweep] [vae] [startup] [importtime] [determinism] [determinism-stages] [overlap] [attn8-tests] [attn8] [bench CONFIGS] [bench-old CONFIGS]
#        [peers1] [peers2] [peers3] [peers-cp2] [peers-cp4] [levers] [fused-quant]
# (default: tests reference optimized). $TESTS narrows the tests (default tests/); $NPROCS lists the process
# counts of `parallel` (default "1 2 4"); $ATTN8_QUANT the --quantize values of `attn8` (default "none fp8");
# $MIXED_VAE the VAE modes of `mixed` (default "compiled eager").
# `bench-old` runs ./old/benchmark.py: the code before a change, exported there with `git archive REV | tar -x -C old`
# and carried, so that old and new rows share one call and one card.
# peers1-3 (issue 16): the peers' rows beside our bf16 one, each step one call of under 10 minutes: peers1 the lossless
# xdit and cache-dit, peers2 the lossy rows with our fp8 one, peers3 para-attn alone (its max-autotune compile). Their
# wheels come from .whl/peers (bash peer_wheels.sh where there is a package index); $PEER_TIMEOUT caps each row.
# peers-cpN (a kind with N GPUs): our context parallelism and ParaAttention's over N GPUs, beside our one-GPU row.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
# diffusers is not on the device image, nor NVIDIA's cuDNN frontend (`import cudnn`, for --attention cudnn-fp8); a
# caller running several of these at once installs them first. A wheel built per Python version is carried once per
# version: pip takes, by package name, the one that fits this interpreter.
install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    --find-links .whl $(ls .whl/*.whl | sed 's#.*/##; s#-.*##' | sort -u)
}
if ! python3 -c "import diffusers, cudnn" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  install_wheels
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
PROMPT="a photograph of a red fox in fresh snow, golden hour"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests reference optimized)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/env.txt"
python3 -c "import cudnn; print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version())" 2>&1 \
  | tail -1 | tee -a "$OUT/env.txt"
status=0
stamp() { python3 -u -c "import sys, time; t = time.time(); [print(f'{time.time() - t:6.1f} {l}', end='') for l in sys.stdin]"; }
# The largest pixel difference per image of each DIR against REF's image of the same name; fails if any differ.
pixel_diffs() {  # REF DIR...
  python3 - "$@" <<'PY'
import glob, os, sys
import numpy as np
from PIL import Image
ref, *dirs = sys.argv[1:]
names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ref, "*.png")))
pixels = lambda folder, name: np.asarray(Image.open(os.path.join(folder, name)), dtype=np.int16)  # noqa: E731
worst = 0 if names else 1
for folder in dirs:
    diffs = [int(np.abs(pixels(folder, n) - pixels(ref, n)).max()) for n in names]
    worst = max([worst, *diffs])
    print(f"{os.path.basename(folder)} against {os.path.basename(ref)}: {len(names)} images, largest pixel difference "
          f"per image {diffs}")
sys.exit(int(worst > 0))
PY
}
while [ ${#steps[@]} -gt 0 ]; do
  step=${steps[0]}; steps=("${steps[@]:1}")
  start=$(date +%s)
  case $step in
    tests) python3 -m pytest -q -rA -m cuda ${TESTS:-tests/} 2>&1 | tee "$OUT/gpu_tests.log" || status=1 ;;
    reference) python3 single_file_inference.py --random-weights --prompt "$PROMPT" --warmup 1 --runs 3 \
                 --timings-json "$OUT/reference.json" --output "$OUT/reference.png" 2>&1 | tee "$OUT/reference.log" || status=1 ;;
    optimized) python3 optimized_inference.py --random-weights --prompt "$PROMPT" --no-text-buckets --runs 3 \
                 --timings-json "$OUT/optimized.json" --output "$OUT/optimized.png" --profile "$OUT/profile.json" 2>&1 | tee "$OUT/optimized.log" || status=1 ;;
    prompts)  # issue 5: 8 prompts over 3 sizes in one process
      python3 - "$OUT/prompts.jsonl" <<'PY'
import json, sys
sizes = [(1024, 1024), (768, 1360), (1360, 768)]
with open(sys.argv[1], "w") as f:
    for i in range(8):
        h, w = sizes[i * len(sizes) // 8]
        f.write(json.dumps({"prompt": f"prompt {i}: a lighthouse on a cliff, storm", "height": h, "width": w}) + "\n")
PY
      python3 optimized_inference.py --random-weights --prompts-file "$OUT/prompts.jsonl" --batch-size 2 \
        --output-dir /tmp/prompts-out --compile-cache /tmp/cc-prompts 2>&1 | tee "$OUT/prompts.log" || status=1 ;;
    ttfi)  # issue 5: time to first image of a whole process, with an empty compile cache and then a warm one
      rm -rf /tmp/cc-ttfi
      for run in cold warm; do  # a whole process: model build, compile (from the cache when warm), one image
        t0=$(date +%s.%N)
        python3 optimized_inference.py --random-weights --prompt "a lighthouse" --warmup 0 --runs 1 \
          --output /tmp/ttfi.png --compile-cache /tmp/cc-ttfi 2>&1 | tail -5 | tee -a "$OUT/ttfi.log" || status=1
        echo "$run time to first image: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" \
          | tee -a "$OUT/ttfi.log"
      done ;;
    offload)  # issue 5: peak GPU memory with CLIP/T5 streamed to the GPU layer by layer
      python3 optimized_inference.py --random-weights --prompt "$PROMPT" --no-text-buckets --offload-text-encoders \
        --runs 1 --timings-json "$OUT/offload.json" --output /tmp/offload.png 2>&1 | tee "$OUT/offload.log" || status=1 ;;
    fp8-error)  # issue 6: fp8's velocity error and image PSNR/SSIM against bf16 at full size
      python3 optimized_inference.py --random-weights --prompt "$PROMPT" --no-text-buckets --quantize fp8 \
        --compare-bf16 --runs 1 --timings-json "$OUT/fp8-error.json" --output "$OUT/fp8.png" 2>&1 \
        | tee "$OUT/fp8-error.log" || status=1 ;;
    fused-quant)  # issue 15: fp8 with and without --fp8-fused-quant, each its own process: denoiser time, and fp8's
                  # velocity error and PSNR/SSIM against bf16 (--compare-bf16, eager, after the timed runs); `static`:
                  # fused with --no-dynamic-shapes (run 31's NaN). $FUSED_QUANT_MODES narrows (default "on off static")
      for mode in ${FUSED_QUANT_MODES:-on off static}; do
        flags=(); [ $mode = off ] && flags=(--no-fp8-fused-quant); [ $mode = static ] && flags=(--no-dynamic-shapes)
        python3 optimized_inference.py --random-weights --prompt "$PROMPT" --no-text-buckets --quantize fp8 \
          --compare-bf16 --runs 3 "${flags[@]}" --timings-json "$OUT/fused-quant-$mode.json" \
          --output /tmp/fused-quant-$mode.png 2>&1 | tee "$OUT/fused-quant-$mode.log" || status=1
      done ;;
    attn8-tests)  # issue 15: cuDNN's fp8 attention at FLUX's shape, in a CUDA graph, compiled, in the full model
      python3 -m pytest -q -rA -s -m cuda tests/test_attention_fp8.py 2>&1 | tee "$OUT/attn8-tests.log" || status=1 ;;
    attn8)  # issue 15: bf16 against 8-bit attention, with bf16 and with fp8 linear layers, one seed; then the
            # 8-bit image's PSNR/SSIM against the bf16-attention one (random weights: a proxy, the error understated)
      for quant in ${ATTN8_QUANT:-none fp8}; do
        for attn in auto cudnn-fp8; do
          name=attn8-$quant-$attn
          python3 optimized_inference.py --random-weights --prompt "$PROMPT" --no-text-buckets --runs 3 \
            --quantize $quant --attention $attn --timings-json "$OUT/$name.json" --output "$OUT/$name.png" \
            --profile "$OUT/$name-profile.json" 2>&1 | tee "$OUT/$name.log" || status=1
        done
        python3 - "$OUT/attn8-$quant-cudnn-fp8.png" "$OUT/attn8-$quant-auto.png" 2>&1 <<'PY' | tee -a "$OUT/attn8.log" || status=1
import sys

import numpy as np
from PIL import Image

from fp8 import psnr, ssim

fp8_attention, bf16_attention = (np.asarray(Image.open(path).convert("RGB")) for path in sys.argv[1:])
print(f"{sys.argv[1]} against {sys.argv[2]}: PSNR {psnr(fp8_attention, bf16_attention):.2f} dB, "
      f"SSIM {ssim(fp8_attention, bf16_attention):.4f}")
PY
      done ;;
    parallel)  # issue 7: the same request on 1, 2 and 4 GPUs (a multi-GPU kind)
      for n in ${NPROCS:-1 2 4}; do
        torchrun --standalone --nproc-per-node $n optimized_inference.py --random-weights --prompt "$PROMPT" \
          --no-text-buckets --runs 3 --output "$OUT/cp$n.png" --timings-json "$OUT/cp$n.json" 2>&1 \
          | tee "$OUT/cp$n.log" || status=1
      done ;;
    batch)  # issue 5: throughput of the optimized row at batch sizes 1, 2, 4, 8 (each a benchmark of its own)
      for b in 1 2 4 8; do
        python3 benchmark.py --random-weights --configs opt+attention --batch-size $b --out-dir "$OUT/batch$b" 2>&1 \
          | tee "$OUT/batch$b.log" || status=1
      done ;;
    mixed)  # issue 14: 9 prompts cycling 3 sizes, batch 1, cold (empty compile cache) then warm; VAE compiled or not
      python3 - "$OUT/mixed.jsonl" <<'PY'
import json, sys
sizes = [(1024, 1024), (768, 1360), (1152, 896)]
with open(sys.argv[1], "w") as f:
    for i in range(9):
        h, w = sizes[i % 3]
        f.write(json.dumps({"prompt": f"prompt {i}: a lighthouse on a cliff, storm", "height": h, "width": w}) + "\n")
PY
      for vae in ${MIXED_VAE:-compiled eager}; do  # MIXED_VAE=eager: the default VAE only
        flag=(); [ $vae = compiled ] && flag=(--compile-vae)
        rm -rf /tmp/cc-mixed-$vae
        for run in cold warm ${MIXED_NOPYC:+warm-nopyc}; do  # whole processes; every line stamped with the seconds
          # since the process started. MIXED_NOPYC=1: a third, warm but without the Python bytecode that the first
          # cached (this machine sets PYTHONDONTWRITEBYTECODE; --compile-cache keeps it then: use_compile_cache)
          [ $run = warm-nopyc ] && rm -rf /tmp/cc-mixed-$vae/pycache
          python3 optimized_inference.py --random-weights --prompts-file "$OUT/mixed.jsonl" "${flag[@]}" \
            --output-dir /tmp/mixed-$vae-$run --compile-cache /tmp/cc-mixed-$vae 2>&1 | stamp | grep -v "it/s\]$" \
            | tee "$OUT/mixed-$vae-$run.log" || status=1
        done
        # The warm process ran the graphs the cold one saved (precompile.py): the same pixels, or a stale graph ran.
        pixel_diffs /tmp/mixed-$vae-cold /tmp/mixed-$vae-warm${MIXED_NOPYC:+ /tmp/mixed-$vae-warm-nopyc} 2>&1 \
          | tee -a "$OUT/mixed-$vae-warm.log" || status=1
      done ;;
    deferred-vae)  # issue 14: --deferred-vae against the VAE built at load, on one machine: a cold process (at load),
                   # then a warm one each way, over one prompt per size; the warm images against the cold ones
      python3 - "$OUT/three.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i, (h, w) in enumerate([(1024, 1024), (768, 1360), (1152, 896)]):
        f.write(json.dumps({"prompt": f"prompt {i}: a lighthouse on a cliff, storm", "height": h, "width": w}) + "\n")
PY
      rm -rf /tmp/cc-deferred
      for run in cold-atload warm-atload warm-deferred; do
        flag=(); [ "${run#*-}" = atload ] && flag=(--no-deferred-vae)
        python3 optimized_inference.py --random-weights --prompts-file "$OUT/three.jsonl" "${flag[@]}" \
          --output-dir /tmp/deferred-$run --compile-cache /tmp/cc-deferred 2>&1 | stamp | grep -v "it/s\]$" \
          | tee "$OUT/deferred-$run.log" || status=1
      done
      pixel_diffs /tmp/deferred-{cold-atload,warm-atload,warm-deferred} 2>&1 | tee -a "$OUT/deferred-compare.log" \
        || status=1
      ;;
    sweep)  # issue 14: steady state at 1024x1024 per batch size in one process per mode (dynamic bf16, static bf16,
            # dynamic fp8); each batch size warmed up with a 2-step request (same shapes), then timed
      for mode in "none dynamic 1,2,4,8,16" "none static 1" "fp8 dynamic 1,2,4,8"; do
        python3 - $mode <<'PY' 2>&1 | grep -v "it/s\]$" | tee -a "$OUT/sweep.log" || status=1
import dataclasses, json, sys, time, torch
import optimized_inference as oi
quantize, shapes, batches = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")]
opts = oi.effective_options(oi.Options(text_buckets=False, quantize=quantize, dynamic_shapes=shapes == "dynamic"),
                            torch.device("cuda"))
torch._dynamo.config.recompile_limit = 32
pipe = oi.load_pipeline("black-forest-labs/FLUX.1-dev", "cuda", torch.bfloat16, opts, random_weights=True)
for b in batches:
    req = lambda steps: oi.Request(["a fox in snow"] * b, ["a fox in snow"] * b, 1024, 1024, steps, 3.5,
                                   list(range(b)), 512)
    t0 = time.perf_counter()
    oi.generate(pipe, req(2), oi.Timer(pipe.device))
    oi.sync(pipe.device)
    warm = time.perf_counter() - t0
    _, per_run, _ = oi.timed_runs(pipe, req(28), 0, 2 if b <= 2 else 1)
    s = oi.summarize(per_run, warm, pipe.device)
    print(json.dumps({"quantize": quantize, "shapes": shapes, "batch": b, "warmup_s": round(warm, 1),
                      **{k: round(s[k]["median"], 3) for k in ("denoiser", "vae", "end_to_end")},
                      "s_per_image": round(s["end_to_end"]["median"] / b, 3),
                      "images_per_hour": round(3600 * b / s["end_to_end"]["median"]),
                      "peak_GiB": round(s["peak_mem_GiB"], 1)}))
print(oi.describe(pipe))
PY
      done
      grep '^{' "$OUT/sweep.log" ;;
    vae)  # the VAE's options at 1024x1024, each a process: eager channels-last (default), eager contiguous, compiled
      for flags in "" "--no-channels-last-vae" "--compile-vae"; do
        name=vae${flags:+-${flags#--}}
        python3 optimized_inference.py --random-weights --prompt "$PROMPT" --no-text-buckets --runs 3 $flags \
          --timings-json "$OUT/$name.json" --output /tmp/$name.png 2>&1 | tail -6 | tee "$OUT/$name.log" || status=1
      done ;;
    startup)  # issue 14: where a warm start's time goes: imports, CUDA, model build, loading the saved graphs
      # (precompile.py), the first image. The first process fills /tmp/cc-startup (or finds it warm), the second is
      # the warm one. Not the CLI's graphs: they are saved for the script run as __main__, these for the module.
      for run in first warm; do
        echo "== $run process" | tee -a "$OUT/startup.log"
        python3 - <<'PY' 2>&1 | grep -v "it/s\]$" | tee -a "$OUT/startup.log"
import time
t = time.time()
def lap(what):
    global t
    print(f"{what}: {time.time() - t:.2f}s", flush=True)
    t = time.time()
import torch; lap("import torch")
import optimized_inference as oi; lap("import optimized_inference")
torch.zeros(1, device="cuda"); lap("CUDA context")
import torch._dynamo; lap("import torch._dynamo")
from diffusers import AutoencoderKL; lap("from diffusers import AutoencoderKL")
from transformers import CLIPTextModel, T5EncoderModel; lap("from transformers import CLIPTextModel, T5EncoderModel")
import prompts_file
precompiled = prompts_file.use_compile_cache("/tmp/cc-startup"); lap(f"use_compile_cache: saved graphs in {precompiled}")
compile_blocks, spent = oi.compile_blocks, []
def timed_compile_blocks(*args):  # the saved graphs load in here
    t0 = time.time(); compile_blocks(*args); spent.append(time.time() - t0)
oi.compile_blocks = timed_compile_blocks
opts = oi.effective_options(oi.Options(), torch.device("cuda"))
pipe = oi.load_pipeline("black-forest-labs/FLUX.1-dev", "cuda", torch.bfloat16, opts, random_weights=True,
                        precompiled=precompiled)
lap(f"load_pipeline (random weights; {sum(spent):.2f}s of it loading "
    f"{sum(k.loaded for k in getattr(pipe.transformer, 'precompiled', ()))} saved graphs)")
oi.generate(pipe, oi.Request(["a fox"], ["a fox"], 1024, 1024, 28, 3.5, [0], 512), oi.Timer(pipe.device))
oi.sync(pipe.device); lap("first image (1024x1024, 28 steps: the step's capture included)")
print(oi.describe(pipe))
print(torch._dynamo.utils.compile_times())
PY
      done ;;
    importtime)  # issue 14: what a warm start imports: `python3 -X importtime` on the CLI with one prompt, a cold
                 # process (fills the cache) then two warm ones; the interpreter's bytecode settings first
      python3 -c "import sys, torch; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'pycache_prefix', sys.pycache_prefix, torch.__file__)" | tee "$OUT/imports-env.txt"
      ls "$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')/__pycache__" | head -3 | tee -a "$OUT/imports-env.txt"
      echo '{"prompt": "a lighthouse on a cliff, storm", "height": 1024, "width": 1024}' > "$OUT/one.jsonl"
      rm -rf /tmp/cc-imports
      for run in cold warm1 warm2; do
        python3 -X importtime optimized_inference.py --random-weights --prompts-file "$OUT/one.jsonl" \
          --output-dir /tmp/imports-$run --compile-cache /tmp/cc-imports 2> "$OUT/importtime-$run.txt" | stamp \
          | tee "$OUT/imports-$run.log" || status=1
      done ;;
    determinism)  # runs 40 and 45b: a warm process's pixels 5-6 levels off the cold one's, now and then. Suspect:
                  # inductor's kernels autotuned again in the warm process (timing picks the config). One 1024x1024
                  # prompt: cold, warm, warm without $TORCHINDUCTOR_CACHE_DIR set before the start; after each, the
                  # autotune results in the cache (count and digest) and the pixels against the cold image
      echo '{"prompt": "a lighthouse on a cliff, storm", "height": 1024, "width": 1024}' > "$OUT/one.jsonl"
      rm -rf /tmp/cc-det
      for run in cold warm warm-unset; do
        touch /tmp/det-mark
        env $([ $run = warm-unset ] && echo -u TORCHINDUCTOR_CACHE_DIR) python3 optimized_inference.py --random-weights \
          --prompts-file "$OUT/one.jsonl" --output-dir /tmp/det-$run --compile-cache /tmp/cc-det 2>&1 | stamp \
          | grep -v "it/s\]$" > "$OUT/det-$run.log" || status=1
        echo "$run: $(find /tmp/cc-det -name '*.best_config' | wc -l) best_config files, digest $(find /tmp/cc-det \
          -name '*.best_config' -exec cat {} + | md5sum | cut -c1-12), newest $(find /tmp/cc-det -name '*.best_config' \
          -newer /tmp/det-mark | wc -l) written by this process" | tee -a "$OUT/determinism.log"
        find /tmp /root -name '*.best_config' -newer /tmp/det-mark 2>/dev/null | sed 's#/[^/]*$##' | sort | uniq -c \
          | head -5 | tee -a "$OUT/determinism.log"
      done
      pixel_diffs /tmp/det-{cold,warm,warm-unset} 2>&1 | tee -a "$OUT/determinism.log" || status=1 ;;
    determinism-stages)  # pending 3, next step: which stage a warm process's pixels leave the cold one's in. One
                         # 1024x1024 prompt through the module's functions: cold, warm, then the carried wheels
                         # installed again (runs 45b and 46 saw other pixels right after that) and two more warm
                         # processes; each saves its T5 and CLIP output, latents and image; every pair compared
      rm -rf /tmp/cc-det2 /tmp/det2-*.pt
      for run in cold warm reinstall warm-r1 warm-r2; do
        if [ $run = reinstall ]; then
          install_wheels; continue
        fi
        python3 - $run <<'PY' 2>&1 | grep -v "it/s\]$" | tee -a "$OUT/determinism-stages.log" || status=1
import sys, torch
import optimized_inference as oi, prompts_file
precompiled = prompts_file.use_compile_cache("/tmp/cc-det2")
pipe = oi.load_pipeline("black-forest-labs/FLUX.1-dev", "cuda", torch.bfloat16,
                        oi.effective_options(oi.Options(), torch.device("cuda")), random_weights=True,
                        precompiled=precompiled)
saved, encode, decode = {}, oi.encode_prompt, oi.decode
oi.encode_prompt = lambda *a: saved.setdefault("text", encode(*a))
oi.decode = lambda p, latents: (saved.setdefault("latents", latents.float().cpu()), decode(p, latents))[1]
prompt = ["a lighthouse on a cliff, storm"]
image = oi.generate(pipe, oi.Request(prompt, prompt, 1024, 1024, 28, 3.5, [0], 128), oi.Timer(pipe.device))
torch.save({"txt": saved["text"][0].float().cpu(), "pooled": saved["text"][1].float().cpu(),
            "latents": saved["latents"], "image": torch.from_numpy(image)}, f"/tmp/det2-{sys.argv[1]}.pt")
print(sys.argv[1], "saved;", oi.describe(pipe).split("compile cache")[0][-60:])
PY
      done
      python3 - <<'PY' 2>&1 | tee -a "$OUT/determinism-stages.log"
import torch
runs = ["cold", "warm", "warm-r1", "warm-r2"]
data = {r: torch.load(f"/tmp/det2-{r}.pt") for r in runs}
for key in ("txt", "pooled", "latents", "image"):
    print(key, "largest difference against", " / ".join(runs), ":")
    for a in runs:
        print("  ", a, [float((data[a][key].float() - data[b][key].float()).abs().max()) for b in runs])
PY
      ;;
    overlap)  # issue 14: can the first image's denoise hide diffusers' import and the VAE's build? One process per
              # way at 1024x1024 (eager blocks in CUDA graphs, so no compile): `after` imports and builds once the
              # 28 replays are queued (runs 40-41), `thread` as --deferred-vae does (the import in a thread started
              # once the step is captured, the build after the denoise). Each prints when the queue returned and
              # whether the GPU was still busy then.
      for way in after thread; do
        python3 - $way <<'PY' 2>&1 | tee -a "$OUT/overlap.log" || status=1
import sys, time
import torch
import optimized_inference as oi
from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401  (the CLI has them before the first image)
way, dev, dtype = sys.argv[1], torch.device("cuda"), torch.bfloat16
opts = oi.effective_options(oi.Options(compile=False), dev)
cfg = oi.CONFIGS["flux-dev"]
with oi.default_dtype(dtype):
    with torch.device("meta"):
        model = oi.Flux(cfg, opts)
    model = oi.init_random_(model.to_empty(device=dev)).requires_grad_(False)
t0, marks, stream = time.perf_counter(), [], torch.cuda.current_stream()
def mark(what):  # the default stream, which any thread's work joins
    marks.append(f"{what} at {time.perf_counter() - t0:.2f}s (GPU {'idle' if stream.query() else 'busy'})")
def build():
    from diffusers import AutoencoderKL
    mark("diffusers imported")
    with oi.default_dtype(dtype), torch.device(dev):
        vae = AutoencoderKL(**oi.FLUX_VAE_CONFIG)
    mark("VAE built")
    return vae
pipe = oi.Pipeline(cfg, model, None, None, None, None, None, "random", dev, dtype, opts)
g = torch.Generator().manual_seed(0)
noise = torch.randn(1, 16, 128, 128, generator=g).to(dev, dtype)
txt = torch.randn(1, 512, 4096, generator=g).to(dev, dtype)
pooled = torch.randn(1, 768, generator=g).to(dev, dtype)
oi.denoise(pipe, noise, txt, pooled, oi.flow_match_sigmas(2, 4096, cfg.scheduler), 3.5)  # captures the step
deferred = pipe.vae = oi.DeferredVAE(oi.FLUX_VAE_CONFIG, build) if way != "after" else None
sigmas = oi.flow_match_sigmas(28, 4096, cfg.scheduler)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
t0 = time.perf_counter()
start.record()
latents = oi.denoise(pipe, noise, txt, pooled, sigmas, 3.5)
end.record()
mark("28 replays queued" + (f", import thread {'running' if deferred.thread.is_alive() else 'done'}" if deferred else ""))
deferred.build() if way != "after" else build()
mark("import and build done")
torch.cuda.synchronize()
mark("synchronized")
print(f"== {way}: denoise {start.elapsed_time(end) / 1000:.2f}s on the GPU; " + "; ".join(marks))
PY
      done ;;
    levers)  # issue 15: each candidate kernel change timed alone at FLUX's shapes against today's path (profiling.py);
             # $LEVERS narrows them (default L1,L2,L3)
      python3 profiling.py levers --levers "${LEVERS:-L1,L2,L3}" --out "$OUT/levers" 2>&1 | tee "$OUT/levers.log" \
        || status=1 ;;
    peers1|peers2|peers3|peers-cp2|peers-cp4)  # our bf16 row in every call: each table carries its reference
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/peers/*.whl && export PYTHONPATH=/tmp/site || status=1
      case $step in
        peers1) configs=opt+attention,xdit,cache-dit; timeout=${PEER_TIMEOUT:-240} ;;
        peers2) configs=opt+attention,opt-fp8,cache-dit-dbcache,para-attn-fbcache; timeout=${PEER_TIMEOUT:-240} ;;
        peers3) configs=opt+attention,para-attn; timeout=${PEER_TIMEOUT:-450} ;;
        peers-cp*) n=${step#peers-cp}; configs=opt+attention,opt-cp$n,para-attn-cp$n; timeout=${PEER_TIMEOUT:-400} ;;
      esac
      python3 benchmark.py --random-weights --configs "$configs" --timeout "$timeout" \
        --out-dir "$OUT/$step" 2>&1 | tee "$OUT/$step.log" || status=1 ;;
    bench|bench-old) configs=${steps[0]}; steps=("${steps[@]:1}"); dir=.; [ "$step" = bench-old ] && dir=old
           python3 $dir/benchmark.py --random-weights --configs "$configs" --out-dir "$OUT/$step" 2>&1 \
             | tee "$OUT/$step.log" || status=1 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step: $(( $(date +%s) - start ))s"
done
for f in "$OUT"/mixed-*.log; do [ -f "$f" ] && { echo "$f"; grep -E "models loaded|first batch in|images in" "$f"; }; done
for f in "$OUT"/bench/results.md "$OUT"/bench-old/results.md "$OUT"/peers*/results.md; do [ -f "$f" ] && { echo "$f"; grep '^|' "$f"; }; done
[ -f "$OUT/levers/table.txt" ] && { echo "$OUT/levers/table.txt"; cat "$OUT/levers/table.txt"; }
for f in "$OUT"/reference.json "$OUT"/optimized.json "$OUT"/offload.json "$OUT"/fp8-error.json "$OUT"/cp*.json "$OUT"/vae*.json \
         "$OUT"/attn8-{none,fp8}-{auto,cudnn-fp8}.json "$OUT"/fused-quant-{on,off,static}.json; do
  [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], *(f'{k}={d[k][\"median\"]:.3f}s' for k in ('text_encoders','denoiser','vae','end_to_end')), f'warmup={d[\"warmup_s\"]:.1f}s peak={d.get(\"peak_mem_GiB\",0):.1f}GiB', *(f'{k}={v:.4f}' for k, v in d.get('fp8_vs_bf16', {}).items()))" "$f"
done
exit $status
