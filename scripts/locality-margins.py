#!/usr/bin/env python3
"""Which neighbour prompts a sequential run's edits disturbed, against how firmly the unedited
model held its prediction there.

Reads the per-case lines of a `kedit eval --sequential end` run on CounterFact-style records
(each with one neighbourhood prompt; their `post` is taken after the run's last edit) and asks
the unedited model, through `kedit generate --json`, for its top two logits at the first answer
position of every neighbour prompt. Prints, for prompts whose first-position argmax changed and
for those that kept it, the top-1/top-2 margin, and how many prompts flip below and above a few
margins. With --json FILE the per-prompt rows are written there too.

    scripts/locality-margins.py RESULTS.jsonl [--kedit BIN] [--model GGUF] [--json FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def first_position_logits(kedit, model, prompt):
    run = subprocess.run(
        [kedit, "generate", "--model", model, "--threads", "1", "-p", prompt,
         "--max-new-tokens", "1", "--json"],
        capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"locality-margins: kedit generate failed on {prompt!r}: "
                 f"{(run.stderr.strip().splitlines() or ['no message'])[0]}")
    step = json.loads(run.stdout)["steps"][0]
    return step["ids"], step["logits"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--kedit", default="target/release/kedit")
    parser.add_argument("--model", default=os.path.expanduser(
        "~/.cache/kedit/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--json")
    args = parser.parse_args()

    rows = []
    with open(args.results) as lines:
        for number, line in enumerate(lines, 1):
            case = json.loads(line)
            try:
                prompt = case["requested_rewrite"]["locality"]["neighborhood"]["prompt"][0]
                before = case["pre"]["locality"]["neighborhood_output"][0][0]
                after = case["post"]["locality"]["neighborhood_output"][0][0]
            except (KeyError, IndexError, TypeError):
                sys.exit(f"locality-margins: {args.results} line {number}: no neighbourhood "
                         "prompt with pre and post outputs (a CounterFact-style eval run?)")
            ids, logits = first_position_logits(args.kedit, args.model, prompt)
            if ids[0] != before:
                sys.exit(f"locality-margins: {args.results} line {number}: the model's argmax "
                         f"{ids[0]} is not the run's pre-edit output {before} (another model?)")
            rows.append({
                "case_id": case.get("case_id"),
                "flipped": after != before,
                "margin": logits[0] - logits[1],
                "edited_prediction_unedited_rank": ids.index(after) if after in ids else None,
            })
    if not rows:
        sys.exit(f"locality-margins: {args.results} holds no cases")
    if args.json:
        with open(args.json + ".tmp", "w") as out:
            json.dump(rows, out, indent=1)
        os.replace(args.json + ".tmp", args.json)

    for flipped, label in ((True, "changed"), (False, "kept")):
        margins = [r["margin"] for r in rows if r["flipped"] == flipped]
        if margins:
            print(f"{label}: {len(margins)} prompts, median top-1/top-2 margin "
                  f"{statistics.median(margins):.2f}, mean {statistics.mean(margins):.2f}")
    changed = [r for r in rows if r["flipped"]]
    print(f"changed to the unedited model's second choice: "
          f"{sum(r['edited_prediction_unedited_rank'] == 1 for r in changed)}, to one of its top "
          f"five: {sum(r['edited_prediction_unedited_rank'] is not None for r in changed)}, "
          f"of {len(changed)}")
    for threshold in (0.25, 0.5, 1.0, 2.0):
        below = [r for r in rows if r["margin"] < threshold]
        above = [r for r in rows if r["margin"] >= threshold]
        print(f"margin < {threshold}: {sum(r['flipped'] for r in below)} of {len(below)} changed; "
              f">= {threshold}: {sum(r['flipped'] for r in above)} of {len(above)}")


if __name__ == "__main__":
    main()
