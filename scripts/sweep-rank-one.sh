#!/usr/bin/env bash
# Score MEMIT or AlphaEdit hparams variants on dev records at several batch sizes, one line each.
#
#   scripts/sweep-rank-one.sh HPARAMS FIELD "V1 V2 ..." [OUT_DIR]
#
# Each value of FIELD is written into a copy of HPARAMS, then `kedit eval` runs it over LIMIT records
# of DATA from OFFSET, for every batch size in BATCHES (each batch edited on the unedited model, as
# EasyEdit's batch_edit does). The default records are 1000-1049 of the CounterFact train split:
# neither an evaluation record nor one of the 1,000 the lifelong runs edit.
#
# A case's edit time is its batch's, so s/request is that over the batch size.
#
# Environment: KEDIT (binary), MODEL (GGUF or folder), DATA, OFFSET, LIMIT, BATCHES, THREADS.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n 2,11p "$0" >&2
    exit 2
fi
hparams=$1 field=$2 values=$3 out=${4:-sweep-out}
here=$(cd "$(dirname "$0")/.." && pwd)
kedit=${KEDIT:-$here/target/release/kedit}
model=${MODEL:-$HOME/.cache/kedit/models/SmolLM2-135M-Instruct.Q4_1.gguf}
data=${DATA:-$here/../shared/data/train/counterfact_easyedit_train.json}
offset=${OFFSET:-1000} limit=${LIMIT:-50} batches=${BATCHES:-"1 10 50"} threads=${THREADS:-1}

grep -q "^$field:" "$hparams" || { echo "sweep: $hparams has no field $field" >&2; exit 2; }
editor=$(sed -n 's/^alg_name: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' "$hparams")
mkdir -p "$out"
printf 'editor\t%s\tbatch\trewrite\trephrase\tlocality\ts/request\n' "$field"
for value in $values; do
    variant=$out/$editor-$field-$value.yaml
    sed "s/^$field:.*/$field: $value/" "$hparams" > "$variant"
    for batch in $batches; do
        run=$out/$editor-$field-$value-b$batch.jsonl
        "$kedit" eval --model "$model" --editor "$editor" --hparams "$variant" --data "$data" \
            --offset "$offset" --limit "$limit" --batch-size "$batch" --threads "$threads" \
            --out "$run" --resume --quiet
        "$kedit" report "$run" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)["summary"]
p = s["post"]
print("\t".join([sys.argv[1], sys.argv[2], sys.argv[3], "%.1f" % p["rewrite_acc"],
                 "%.1f" % p["rephrase_acc"], "%.1f" % p["locality"], "%.2f" % (s["edit_seconds"] / int(sys.argv[3]))]))
' "$editor" "$value" "$batch"
    done
done
