#!/usr/bin/env bash
# InstructEdit's comparison (its paper's Table 2, issue 14), under one training budget for every
# editor:
#   (a) MEND trained on one task, for each task;
#   (b) MEND trained on the mixture of the tasks, without instructions;
#   (c) InstructEdit trained on the same mixture, with instructions;
# each evaluated on held-out records of every training task, on the held-out task ZsRE (MEND's
# eval split and KnowEdit's test split), and InstructEdit again with the held-out ("unseen")
# instruction. Writes $OUT/table.md (reliability / generalization / locality / portability, %)
# and $OUT/updates-pca.svg (the principal components of multi-task MEND's and InstructEdit's
# updates, by task: the paper's Fig. 4).
#
# Training data: ../shared/data/train (never an evaluation file). WikiData_recent has no test split
# here, so every fifth record of its training file is held out of training for testing (the records
# are copied unchanged into $OUT/data). CounterFact is tested on KnowEdit's test split, ConvSent
# on its test split, ZsRE is never trained on.
#
# Knobs (environment): KEDIT, MODEL, DATA, OUT, STEPS (optimiser updates per run), LIMIT (records
# per evaluation file), TASKS (the mixture; the default is EasyEdit's LLaMA recipe, counterfact
# and wikirecent; add convsent for its GPT2-XL recipe, whose micro-batches cost ~2.5 facts' with
# the SmolLM2 file's sentences_per_topic: 4), SINGLE (0 skips the single-task MEND runs, (a)).
# Reruns skip what is done: training resumes from its checkpoint, finished evaluations are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
KEDIT=${KEDIT:-target/release/kedit}
MODEL=${MODEL:-$HOME/.cache/kedit/models/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/instructedit-comparison}
STEPS=${STEPS:-50}
LIMIT=${LIMIT:-50}
TASKS=${TASKS:-counterfact wikirecent}
SINGLE=${SINGLE:-1}
MEND_TRAIN=hparams/TRAINING/MEND/smollm2-135m.yaml
IE_TRAIN=hparams/TRAINING/InstructEdit/smollm2-135m.yaml

mkdir -p "$OUT/data" "$OUT/models" "$OUT/eval"

# The held-out part of WikiData_recent's training file, and the rest.
python3 - "$DATA/train/knowedit_wiki_recent_train.json" "$OUT/data" <<'EOF'
import json, sys, os
records = json.load(open(sys.argv[1]))
out = sys.argv[2]
train = [r for i, r in enumerate(records) if i % 5 != 4]
test = [r for i, r in enumerate(records) if i % 5 == 4]
for name, part in (("wikirecent-train.json", train), ("wikirecent-test.json", test)):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            json.dump(part, f, ensure_ascii=False, indent=1)
        os.replace(path + ".tmp", path)
EOF

train_file() {
  case $1 in
    counterfact) echo "$DATA/train/knowedit_wiki_counterfact_train.json" ;;
    wikirecent) echo "$OUT/data/wikirecent-train.json" ;;
    convsent) echo "$DATA/train/knowedit_convsent_val.json" ;;
    *) echo "unknown task $1" >&2; exit 2 ;;
  esac
}
test_files() {
  case $1 in
    counterfact) echo "counterfact=$DATA/knowedit_wiki_counterfact_test.json" ;;
    wikirecent) echo "wikirecent=$OUT/data/wikirecent-test.json" ;;
    convsent) echo "convsent=$DATA/knowedit_convsent_test.json" ;;
  esac
}

train() { # name editor hparams data...
  local name=$1 editor=$2 hparams=$3; shift 3
  local dir="$OUT/models/$name" resume=()
  [ -f "$dir/last.safetensors" ] && resume=(--resume)
  echo "== train $name ($editor, $STEPS updates)" >&2
  /usr/bin/time -f "$name: %e s, peak RSS %M KB" -a -o "$OUT/train-times.txt" \
    "$KEDIT" train --editor "$editor" --model "$MODEL" --hparams "$hparams" "$@" \
    --out "$dir" --max-steps "$STEPS" --no-early-stop --quiet --json "${resume[@]}" \
    >> "$OUT/models/$name.validation.jsonl"
}

mixture=()
for task in $TASKS; do
  [ "$SINGLE" = 1 ] && train "mend-$task" MEND "$MEND_TRAIN" --data "$task=$(train_file "$task")"
  mixture+=(--data "$task=$(train_file "$task")")
done
train mend-multi MEND "$MEND_TRAIN" "${mixture[@]}"
train instructedit InstructEdit "$IE_TRAIN" "${mixture[@]}"

evaluate() { # name editor hparams archive tagged-file [extra...]
  local name=$1 editor=$2 hparams=$3 archive=$4 tagged=$5; shift 5
  local file=${tagged#*=}
  [ -s "$OUT/eval/$name.json" ] && return
  echo "== eval $name" >&2
  "$KEDIT" eval --editor "$editor" --model "$MODEL" --hparams "$hparams" --archive "$archive" \
    --data "$file" --limit "$LIMIT" --quiet --json --out "$OUT/eval/$name.jsonl" "$@" \
    > "$OUT/eval/$name.json.tmp"
  mv "$OUT/eval/$name.json.tmp" "$OUT/eval/$name.json"
}

sets=()
for task in $TASKS; do sets+=("$(test_files "$task")"); done
sets+=("zsre-mend=$DATA/zsre_mend_eval.json" "zsre-knowedit=$DATA/knowedit_zsre_test.json")
for tagged in "${sets[@]}"; do
  set_name=${tagged%%=*}
  for task in $TASKS; do
    [ "$SINGLE" = 1 ] || continue
    evaluate "mend-$task.$set_name" MEND hparams/MEND/smollm2-135m.yaml "$OUT/models/mend-$task" "$tagged"
  done
  evaluate "mend-multi.$set_name" MEND hparams/MEND/smollm2-135m.yaml "$OUT/models/mend-multi" "$tagged"
  evaluate "instructedit.$set_name" InstructEdit hparams/InstructEdit/smollm2-135m.yaml \
    "$OUT/models/instructedit" "$tagged"
  evaluate "instructedit-unseen.$set_name" InstructEdit hparams/InstructEdit/smollm2-135m.yaml \
    "$OUT/models/instructedit" "$tagged" --unseen-instruction
done

# The paper's Fig. 4: the principal components of each editor's updates, by task.
if [ ! -s "$OUT/updates-pca.svg" ]; then
  figure_data=()
  for tagged in "${sets[@]}"; do
    case ${tagged%%=*} in
      zsre-mend) figure_data+=(--data "zsre=${tagged#*=}") ;;
      zsre-knowedit) ;;
      *) figure_data+=(--data "$tagged") ;;
    esac
  done
  "$KEDIT" plot-updates --model "$MODEL" --editor "MEND=$OUT/models/mend-multi" \
    --editor "InstructEdit=$OUT/models/instructedit" "${figure_data[@]}" --limit "$LIMIT" \
    --out "$OUT/updates-pca.svg" --json --quiet > "$OUT/updates-pca.jsonl"
fi

python3 - "$OUT" "$STEPS" "$LIMIT" $TASKS <<'EOF'
import json, os, sys
out, steps, limit, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sets = tasks + ["zsre-mend", "zsre-knowedit"]
editors = [(f"mend-{t}", f"MEND ({t} only)") for t in tasks] + [
    ("mend-multi", "MEND (multi-task)"),
    ("instructedit", "InstructEdit"),
    ("instructedit-unseen", "InstructEdit, unseen instruction"),
]
def cell(s, key):
    v = s["post"].get(key)
    return "-" if v is None else f"{v:.1f}"
lines = [f"Post-edit %, first {limit} records of each file; {steps} updates per training run.", ""]
head = "| editor | " + " | ".join(f"{s} rel / gen / loc / port" for s in sets) + " |"
lines += [head, "|---" * (len(sets) + 1) + "|"]
for key, label in editors:
    row = [label]
    for s in sets:
        path = os.path.join(out, "eval", f"{key}.{s}.json")
        if not os.path.exists(path):
            row.append("")
            continue
        summary = json.load(open(path))
        row.append(" / ".join(cell(summary, k) for k in ("rewrite_acc", "rephrase_acc", "locality", "portability")))
    lines.append("| " + " | ".join(row) + " |")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "table.md"), "w").write(text)
print(text)
EOF
