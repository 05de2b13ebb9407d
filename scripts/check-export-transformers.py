#!/usr/bin/env python3
"""Check that transformers reads a folder written by `kedit export` as kedit does.

    python3 scripts/check-export-transformers.py FOLDER [--kedit target/release/kedit] [--prompt P ...]

For each prompt, kedit greedily generates --steps tokens from FOLDER and prints the top-5 logits
of every step (`kedit generate --json`); transformers loads the same folder (AutoModelForCausalLM,
AutoTokenizer, float32) and is fed the same ids. The script fails unless the tokenisation is the
same and every top-5 logit agrees within --tolerance. Needs torch and transformers
(`pip install torch transformers`); not part of CI.
"""
import argparse
import json
import subprocess
import sys

PROMPTS = [
    "The capital of France is",
    "The mother tongue of Danielle Darrieux is",
    "Danielle Darrieux was born in",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--kedit", default="target/release/kedit")
    ap.add_argument("--prompt", action="append")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    model.eval()

    worst = 0.0
    failed = False
    for prompt in args.prompt or PROMPTS:
        out = subprocess.run(
            [args.kedit, "generate", "--model", args.folder, "--dtype", "f32", "--json",
             "--prompt", prompt, "--max-new-tokens", str(args.steps)],
            check=True, capture_output=True, text=True,
        )
        ours = json.loads(out.stdout)
        theirs_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if theirs_ids != ours["prompt_ids"]:
            print(f"{prompt!r}: token ids differ: kedit {ours['prompt_ids']}, transformers {theirs_ids}")
            failed = True
            continue
        ids = list(ours["prompt_ids"])
        for step, (next_id, top) in enumerate(zip(ours["generated_ids"], ours["steps"])):
            logits = model(torch.tensor([ids])).logits[0, -1]
            for token, value in zip(top["ids"], top["logits"]):
                gap = abs(float(logits[token]) - value)
                worst = max(worst, gap)
                if gap > args.tolerance:
                    print(f"{prompt!r} step {step}: token {token}: kedit {value}, transformers {float(logits[token])}")
                    failed = True
            if int(logits.argmax()) != next_id:
                print(f"{prompt!r} step {step}: kedit chose {next_id}, transformers {int(logits.argmax())}")
                failed = True
            ids.append(next_id)
        print(f"{prompt!r}: {ours['text']!r}")
    print(f"largest top-5 logit gap: {worst:.3g} (tolerance {args.tolerance:g})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
