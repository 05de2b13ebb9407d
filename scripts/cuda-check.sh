#!/usr/bin/env bash
# The GPU check: kedit built with `--features cuda` (scripts/install-cuda-toolkit.sh, then
# `cargo build --release --features cuda` and `cargo test --release --features cuda --no-run`),
# run on a machine with an NVIDIA GPU and no Rust toolchain, cheapest and most telling first:
#   0. the first use of the device (the same short generation twice, then a longer one): what the
#      driver's compile of candle's PTX for this GPU costs, and the cost of a generated token;
#   1. AlphaEdit's statistics, null-space projector and one edit made on the CPU and on the GPU,
#      compared tensor by tensor, and an edit on the CPU from the GPU's statistics;
#   2. test binaries with KEDIT_TEST_DEVICE=cuda, so their models and their kedit processes run
#      on the GPU; those named in PER_TEST one test at a time, each timed;
#   3. random-weight SmolLM2- and GPT2-XL-shaped checkpoints (scripts/make-shaped-checkpoint.py):
#      forward throughput beside a product at the MLP's width (`kedit inspect --throughput`),
#      key statistics and ROME edits (`kedit eval`, then one `kedit apply` that says where its time
#      went), each under /usr/bin/time where it exists.
# usage: scripts/cuda-check.sh BINDIR OUTDIR [DEVICE]
#   BINDIR  holds `kedit` and, under tests/, test binaries (built with CARGO_TARGET_DIR=D: set
#           KEDIT_BUILT_BIN=D/release/kedit, where the tests look for kedit)
#   DEVICE  cuda (default) or cpu, to rehearse the script on a machine without a GPU
#   TESTS   which test binaries to run (name prefixes; default all)
#   PER_TEST which of them to run a test at a time (default "reference_outputs model_invariants",
#           the two that had not finished within 300 s on the H200), each within TEST_TIMEOUT
#           seconds (default 120); whole test files get FILE_TIMEOUT (default 300)
#   SHAPES  which shaped models to build (default "smollm2-135m gpt2-xl"; "" for none)
#   SAMPLES WikiText-2 articles for ROME's statistics (default 1000), CASES ROME edits (default 5)
set -uo pipefail
bin=$(cd "$1" && pwd)
out=$(mkdir -p "$2" && cd "$2" && pwd)
device=${3:-cuda}
shapes=${SHAPES-"smollm2-135m gpt2-xl"}
tests=${TESTS:-}
per_test=${PER_TEST-"reference_outputs model_invariants"}
test_timeout=${TEST_TIMEOUT:-120}
file_timeout=${FILE_TIMEOUT:-300}
samples=${SAMPLES:-1000}
cases=${CASES:-5}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/kedit-cuda-check}
mkdir -p "$work"
# The driver compiles candle's PTX for the GPU at each module's first load in a process; its cache
# (256 MiB by default) lets later processes skip that, if it is large enough to keep it.
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-$work/nv-compute-cache}
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
log() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
wall_ms() { grep -oE "^== [0-9:]+ $1: rc=[0-9]+ wall=[0-9]+" "$out/summary.txt" | tail -1 | grep -oE '[0-9]+$'; }
timed() { # timed NAME CMD...: stdout+stderr to OUT/NAME.log, peak RSS and wall time appended
  local name=$1; shift
  local start=$(date +%s%N)
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v "$@" >"$out/$name.log" 2>&1
  else
    "$@" >"$out/$name.log" 2>&1
  fi
  local rc=$?
  local ms=$((($(date +%s%N) - start) / 1000000))
  local rss=$(grep -o 'Maximum resident set size (kbytes): [0-9]*' "$out/$name.log" | grep -o '[0-9]*$')
  log "$name: rc=$rc wall=${ms}ms peak_rss_kb=${rss:-?}"
  return $rc
}

if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
  # cuBLAS, cuRAND and NVRTC of CUDA 13: from the toolkit where installed, else from the Python
  # wheels PyTorch brought.
  for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null); do
    [ -e "$d/libcublas.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  if [ -z "${LD_LIBRARY_PATH:-}" ]; then
    d=$(find /opt /usr -name libcublas.so.13 2>/dev/null | head -1)
    [ -n "$d" ] && export LD_LIBRARY_PATH=$(dirname "$d")
  fi
  log "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
fi

# 0. the device's first use. The model the tests use where it is found, else the tiny GPT-2.
probe=${KEDIT_SMOLLM2_GGUF:-${KEDIT_MODELS:-$HOME/.cache/kedit/models}/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$probe" ] || probe="$repo/tests/fixtures/tiny-gpt2"
log "first use: $probe"
for run in 1 2; do
  timed "first-use-$run" "$bin/kedit" generate --model "$probe" --device "$device" \
    --prompt "The capital of France is" --max-new-tokens 8 --json
done
timed "generate-72" "$bin/kedit" generate --model "$probe" --device "$device" \
  --prompt "The capital of France is" --max-new-tokens 72 --json
generated() { # how many tokens a --json generation in OUT/NAME.log made (it may stop at EOS)
  python3 -c 'import json, sys
text = open(sys.argv[1]).read()
print(len(json.JSONDecoder().raw_decode(text[text.index("{"):])[0]["generated_ids"]))' "$out/$1.log" 2>/dev/null || echo 0
}
first=$(wall_ms first-use-1) again=$(wall_ms first-use-2) long=$(wall_ms generate-72)
more=$(( $(generated generate-72) - $(generated first-use-2) ))
log "first use ${first:-?}ms, again ${again:-?}ms (the difference: the driver's compile); $more more tokens took $(( ${long:-0} - ${again:-0} ))ms"

# 1. AlphaEdit on the GPU against the CPU. On 2026-12-04 the patches test found the GPU's edit
# 0.042 away from the CPU's (the CPU's own two product paths, kernels and candle's matmul, put the
# same edit 1% of its size apart): the statistics and one edit are made on each device and
# compared tensor by tensor, to tell which step differs.
if [ "$device" != cpu ]; then
  tiny="$repo/tests/fixtures/tiny-gpt2"
  rm -rf "$work"/alpha-*
  for d in cpu "$device"; do
    timed "alphaedit-stats-$d" "$bin/kedit" stats --model "$tiny" --device "$d" --layers 1 --samples 2 \
      --stats-dir "$work/alpha-$d" -q
    timed "alphaedit-apply-$d" "$bin/kedit" apply -m "$tiny" --device "$d" --editor AlphaEdit \
      --hparams "$repo/tests/fixtures/hparams/alphaedit-tiny-gpt2.yaml" --stats-dir "$work/alpha-$d" \
      --prompt "The capital of France is" --subject France --target Rome --max-new-tokens 2 \
      --no-fluency --save-edit "$work/alpha-$d.safetensors"
  done
  # The GPU's statistics and projector, edited with on the CPU: if that edit is the GPU's, the
  # devices differ only through the statistics; if it is the CPU's, in the edit itself.
  cp -r "$work/alpha-$device" "$work/alpha-cross"
  timed "alphaedit-apply-cross" "$bin/kedit" apply -m "$tiny" --device cpu --editor AlphaEdit \
    --hparams "$repo/tests/fixtures/hparams/alphaedit-tiny-gpt2.yaml" --stats-dir "$work/alpha-cross" \
    --prompt "The capital of France is" --subject France --target Rome --max-new-tokens 2 \
    --no-fluency --save-edit "$work/alpha-cross.safetensors"
  for f in "$work"/alpha-cpu/*/*.safetensors "$work/alpha-cpu.safetensors"; do
    g=$(find "$work/alpha-$device" "$work/alpha-$device.safetensors" -name "$(basename "$f" | sed "s/alpha-cpu/alpha-$device/")" | head -1)
    log "compare $(basename "$f") (cpu, $device)"
    [ -n "$g" ] && python3 "$repo/scripts/compare-safetensors.py" "$f" "$g" | tee -a "$out/summary.txt"
  done
  for pair in "cross $device" "cpu cross"; do
    set -- $pair
    log "compare the edits alpha-$1, alpha-$2"
    python3 "$repo/scripts/compare-safetensors.py" "$work/alpha-$1.safetensors" "$work/alpha-$2.safetensors" | tee -a "$out/summary.txt"
  done
  grep -h "value fit" "$out"/alphaedit-apply-*.log | tee -a "$out/summary.txt"
fi
# 2. the tests, on the GPU. They find their fixtures and the kedit binary where they were built
# (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_kedit): BUILT_AT names that folder, linked to this checkout.
export KEDIT_TEST_DEVICE=$device
if [ -n "${BUILT_AT:-}" ] && [ ! -e "$BUILT_AT" ]; then
  mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$repo" "$BUILT_AT"
fi
# ... and the kedit binary where the build put it (CARGO_TARGET_DIR's release folder, if one was
# set: KEDIT_BUILT_BIN names that path).
built_bin=${KEDIT_BUILT_BIN:-$repo/target/release/kedit}
mkdir -p "$(dirname "$built_bin")" && cp "$bin/kedit" "$built_bin"
chosen() { # chosen NAME LIST: NAME (a test binary, name-hash) starts with a prefix in LIST
  local prefix
  for prefix in $2; do [[ $1 == "$prefix"-* || $1 == "$prefix" ]] && return 0; done
  return 1
}
for t in "$bin"/tests/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  [ -z "$tests" ] || chosen "$name" "$tests" || continue
  if chosen "$name" "$per_test"; then
    # One process per test: which of them is slow on the device, and by how much.
    for case in $("$t" --list 2>/dev/null | sed -n 's/: test$//p'); do
      (cd "$repo" && timeout "$test_timeout" "$t" --exact "$case" >"$out/test-$name-$case.log" 2>&1)
      rc=$?
      log "test $name $case: rc=$rc $(grep -E '^test result' "$out/test-$name-$case.log" | grep -oE 'finished in [0-9.]+s')"
    done
    continue
  fi
  (cd "$repo" && timeout "$file_timeout" "$t" --test-threads 2 >"$out/test-$name.log" 2>&1)
  log "test $name: rc=$? $(grep -E '^test result' "$out/test-$name.log" | tail -1)"
done

# 3. shaped checkpoints
for shape in $shapes; do
  model="$work/$shape"
  [ -d "$model" ] || timed "make-$shape" python3 "$repo/scripts/make-shaped-checkpoint.py" --arch "$shape" --out "$model"
  du -sb "$model" | tee -a "$out/summary.txt"
  timed "inspect-$shape" "$bin/kedit" inspect --model "$model" --device "$device" --throughput --batch 8 --tokens 128 --repeats 5
  grep -E '^ +(forward|product|dtype|device) ' "$out/inspect-$shape.log" | tee -a "$out/summary.txt"
  timed "generate-$shape" "$bin/kedit" generate --model "$model" --device "$device" --prompt "The capital of France is" --max-new-tokens 32
  case $shape in
    gpt2-xl) hp="$repo/hparams/ROME/gpt2-xl.yaml" ;;
    *) hp="$repo/hparams/ROME/smollm2-135m.yaml" ;;
  esac
  layer=$(grep -E '^layers:' "$hp" | grep -oE '[0-9]+' | head -1)
  # statistics over a few WikiText-2 articles rather than 100,000: what is timed is the edit
  sed -E "s/^mom2_n_samples:.*/mom2_n_samples: $samples/" "$hp" >"$work/rome-$shape.yaml"
  timed "stats-$shape" "$bin/kedit" stats --model "$model" --device "$device" --layers "$layer" --samples "$samples" --stats-dir "$work/stats" -q
  timed "rome-$shape" "$bin/kedit" eval --model "$model" --device "$device" --editor ROME --hparams "$work/rome-$shape.yaml" \
    --data "$repo/tests/fixtures/data/counterfact_easyedit_edit.json" --limit "$cases" --stats-dir "$work/stats" --out "$work/rome-$shape.jsonl"
  grep -iE 'edit|reliab' "$out/rome-$shape.log" | tail -4 | tee -a "$out/summary.txt"
  # One edit by `apply`, which prints where its time went (keys, values, solve): on the H200 the
  # two sizes' edits took the same time, so something other than their arithmetic bounds them.
  timed "rome-apply-$shape" "$bin/kedit" apply --model "$model" --device "$device" --editor ROME \
    --hparams "$work/rome-$shape.yaml" --stats-dir "$work/stats" --prompt "The capital of France is" \
    --subject France --target Rome --max-new-tokens 2 --no-fluency
  grep -E '^time:' "$out/rome-apply-$shape.log" | tee -a "$out/summary.txt"
done
log done
