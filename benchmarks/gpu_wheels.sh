#!/usr/bin/env bash
# The wheels benchmarks/qwen_vl_gpu.py needs on a GPU machine that has no network and only
# torch/transformers/peft/accelerate/torchvision (+ the usual scientific stack) installed:
# the project's pinned transformers/peft/datasets, bitsandbytes for the QLoRA step, and what
# those need beyond that machine's packages. Downloaded here into .whl/ (git-ignored; about
# 56 MiB, carried with the working tree). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 benchmarks/qwen_vl_gpu.py --out qwen_vl_gpu.json
# PYV: the GPU machine's Python (3.12 on the lent H200s).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
WHEELS=(
  transformers==5.23.0 peft==0.21.2 datasets==5.2.0 bitsandbytes==0.50.2
  regex==2026.11.19 dill==0.4.1 multiprocess==0.70.19
)
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${plat[@]}" -d .whl "${WHEELS[@]}"
du -sh .whl
