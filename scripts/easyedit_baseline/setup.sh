#!/usr/bin/env bash
# Builds the EasyEdit baseline that kedit's speed is compared with: a virtual environment with
# PyTorch (PyPI's wheel; it runs on the CPU), transformers, and EasyEdit's PyPI release
# easyeditor 0.0.1.dev0 (Oct 2023) unpacked without its 24 pinned dependencies, which ROME does not
# use. That release hard-codes `cuda:{device}` in ROME; the one change made to it is to put those
# tensors on the CPU. Also writes SmolLM2 as a float32 Hugging Face folder (transformers dequantises
# the GGUF), the model EasyEdit loads. The environment takes 5.3 GB on disk (PyTorch and its nvidia
# wheels), the model folder 0.5 GB; not part of CI.
#   usage: scripts/easyedit_baseline/setup.sh [DIR]   (default /tmp/easyedit-baseline)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-/tmp/easyedit-baseline}"
gguf="$("$here/../fetch-model.sh")"
mkdir -p "$dir"
python3 -m venv "$dir/venv"
pip="$dir/venv/bin/pip --quiet --disable-pip-version-check"
$pip install torch==2.5.1 transformers==4.57.1 gguf numpy pyyaml tqdm
$pip install --no-deps accelerate psutil
$pip download --no-deps -d "$dir" easyeditor==0.0.1.dev0
rm -rf "$dir/src" && mkdir -p "$dir/src"
python3 -m zipfile -e "$dir"/easyeditor-0.0.1.dev0-py3-none-any.whl "$dir/src"
sed -i 's/f"cuda:{hparams.device}"/"cpu"/g' "$dir"/src/easyeditor/models/rome/*.py
"$dir/venv/bin/python" "$here/to_hf.py" "$gguf" "$dir/smollm2-hf"
echo "$dir"
