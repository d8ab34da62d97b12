#!/usr/bin/env bash
# The peers' wheels for a machine without a package index: every package of requirements-peers.txt as a wheel in
# .whl/peers/ (para-attn is built here from its source distribution). No dependency is resolved (--no-deps): torch,
# diffusers, transformers, accelerate, peft, safetensors, sentencepiece, numpy, PyYAML and packaging come from the
# machine itself (diffusers from .whl/). gpu_checks.sh's `peers` step installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .whl/peers
grep -v '^\s*#' requirements-peers.txt | sed 's/#.*//' | grep . | grep -v '^para-attn' > /tmp/peer-wheels.txt
python3 -m pip download -q --no-deps --only-binary :all: -d .whl/peers -r /tmp/peer-wheels.txt
python3 -m pip wheel -q --no-deps -w .whl/peers "$(grep '^para-attn' requirements-peers.txt | sed 's/#.*//' | tr -d ' ')"
ls -l .whl/peers
du -ch .whl/peers/*.whl | tail -1
