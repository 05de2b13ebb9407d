#!/usr/bin/env python3
"""kedit beside EasyEdit on this machine: the same SmolLM2, the same hparams files, the same
records, the two programs alternated round by round so that both see the same machine.

Per method it prints the median seconds per edit of each program (EasyEdit: `apply_algo` alone, as
`../shared/peer/run_method.py` times it; kedit: the per-case `time` of `kedit eval`, the edit
alone), their ratio, and the evaluation throughput: cases per second of pre- and post-edit metrics
with the edit's own time taken out (EasyEdit: its edit-and-evaluate total less its edit times;
kedit: its wall time less its edit times and one model load), on CounterFact's flat records only,
where both compute the same metrics (EasyEdit's runner keeps one locality pair of a KnowEdit record
and no portability). The EVAL row measures that throughput where it is most of the time: FT-L cut
to one optimiser step, over --eval-n records.

Needs EasyEdit set up by ../shared/peer (setup_venv.sh, then convert_gguf.py and the
`llama-smollm2-135m` link its README gives) in $PEER_DIR, and a release build of kedit. MEMIT also
needs both programs' covariance statistics: ../shared/peer/compute_stats.py for EasyEdit, `kedit
stats` for kedit (pass --stats-dir and --memit-hparams-peer for a file naming EasyEdit's, and
--memit-hparams-kedit for one naming the corpus and sample count `kedit stats` was given).

usage: PEER_DIR=/scratch/peer python3 scripts/easyedit_baseline/side_by_side.py \
           [--methods FT-L,ROME,EVAL] [--n 10] [--eval-n 30] [--rounds 2] [--threads 2]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared"))

# method → (kedit editor, EasyEdit class name, kedit hparams file, records, layout EasyEdit reads)
METHODS = {
    "FT-L": ("FT-L", "FT", "hparams/FT/smollm2-135m.yaml", "knowedit_zsre_test.json", "knowedit"),
    "ROME": ("ROME", "ROME", "hparams/ROME/smollm2-135m.yaml", "counterfact_easyedit_edit.json", "flat"),
    "MEMIT": ("MEMIT", "MEMIT", "hparams/MEMIT/smollm2-135m.yaml", "counterfact_easyedit_edit.json", "flat"),
    # Evaluation throughput alone: FT-L cut to one optimiser step, so that pre- and post-edit
    # metrics are most of each program's time and the subtraction of edit times adds little noise.
    "EVAL": ("FT-L", "FT", "hparams/FT/smollm2-135m.yaml", "counterfact_easyedit_edit.json", "flat"),
}

# method → hparams keys both programs get changed, for the rows that are not about the method.
OVERRIDES = {"EVAL": {"num_steps": "1"}}


def peer_hparams(src, dst, model_dir):
    """kedit's hparams file with EasyEdit's model path and device: nothing else changes."""
    text = open(src).read()
    text = re.sub(r"(?m)^model_name:.*$", f'model_name: "{model_dir}"', text)
    text = re.sub(r"(?m)^device:.*$", 'device: "cpu"', text)
    open(dst, "w").write(text)


def overridden_hparams(src, dst, overrides):
    """`src` with top-level keys set to new values (each key must already be there)."""
    text = open(src).read()
    for key, value in overrides.items():
        text, n = re.subn(rf"(?m)^{re.escape(key)}:.*$", f"{key}: {value}", text)
        if n != 1:
            sys.exit(f"side_by_side: {src} has no single top-level {key}")
    open(dst, "w").write(text)


def run(cmd, env=None, log=None):
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if log:
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr + "\n")
    if proc.returncode != 0:
        sys.exit(f"side_by_side: {cmd[0]} failed ({proc.returncode}); see {log}\n{proc.stderr[-2000:]}")
    return proc, wall


def easyedit_round(args, n, method, work, data, hparams, threads_env, log):
    out = os.path.join(work, f"easyedit-{method}-{time.time_ns()}.json")
    env = dict(os.environ, PYTHONPATH=os.path.join(args.peer_dir, "easyedit-src"), **threads_env)
    run([os.path.join(args.peer_dir, "venv", "bin", "python"), os.path.join(SHARED, "peer", "run_method.py"),
         "--method", METHODS[method][1], "--hparams", hparams, "--data", data, "--n", str(n),
         "--chunk", "1", "--budget-min", "60", "--out", out, "--workdir", os.path.join(work, "easyedit-run")],
        env=env, log=log)
    result = json.load(open(out))
    edits = [c["edit_s"] for c in result["cases"] if c.get("edit_s") is not None] if "cases" in result else None
    info = result.get("info", result)
    summary = result.get("summary", {})
    if edits is None:
        edits = [summary["edit_s_median"]]
    total = info.get("edit_and_eval_total_s")
    return edits, (total - sum(edits)) if total is not None else None


def kedit_round(args, n, method, work, data, hparams, log, load_s):
    out = os.path.join(work, f"kedit-{method}-{time.time_ns()}.jsonl")
    cmd = [args.kedit, "--threads", str(args.threads), "eval", "--model", args.model,
           "--editor", METHODS[method][0], "--hparams", hparams, "--data", data,
           "--limit", str(n), "--out", out, "--quiet"]
    if args.stats_dir:
        cmd += ["--stats-dir", args.stats_dir]
    _, wall = run(cmd, log=log)
    edits = [json.loads(line)["time"] for line in open(out) if line.strip()]
    return edits, wall - sum(edits) - load_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="FT-L,ROME,EVAL")
    ap.add_argument("--n", type=int, default=10, help="records per method and round")
    ap.add_argument("--eval-n", type=int, default=30, help="records per round of the EVAL row")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peer-dir", default=os.environ.get("PEER_DIR"))
    ap.add_argument("--kedit", default=os.path.join(REPO, "target", "release", "kedit"))
    ap.add_argument("--model", default=None, help="the GGUF (default: scripts/fetch-model.sh)")
    ap.add_argument("--data-dir", default=os.path.join(SHARED, "data"))
    ap.add_argument("--stats-dir", default=None, help="kedit's statistics, for MEMIT")
    ap.add_argument("--memit-hparams-peer", default=None,
                    help="EasyEdit's MEMIT hparams (naming its statistics), instead of kedit's file")
    ap.add_argument("--memit-hparams-kedit", default=None,
                    help="kedit's MEMIT hparams (naming the corpus and sample count its statistics were "
                         "gathered with), instead of hparams/MEMIT/smollm2-135m.yaml")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    if not args.peer_dir or not os.path.isdir(os.path.join(args.peer_dir, "venv")):
        sys.exit("side_by_side: set PEER_DIR to an EasyEdit set up by ../shared/peer/setup_venv.sh")
    if not os.access(args.kedit, os.X_OK):
        sys.exit(f"side_by_side: {args.kedit} missing: cargo build --release")
    if args.model is None:
        args.model = subprocess.run([os.path.join(REPO, "scripts", "fetch-model.sh")], capture_output=True,
                                    text=True, check=True).stdout.strip()
    work = args.work or tempfile.mkdtemp(prefix="side-by-side-")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "log.txt")
    threads_env = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    model_dir = os.path.join(args.peer_dir, "llama-smollm2-135m")

    # One model load of kedit, taken out of its evaluation time as EasyEdit's load is out of its own.
    _, load_s = run([args.kedit, "--threads", str(args.threads), "inspect", "-m", args.model], log=log)

    rows = []
    for method in args.methods.split(","):
        if method not in METHODS:
            sys.exit(f"side_by_side: unknown method {method} (known: {', '.join(METHODS)})")
        _, _, kedit_hparams, records, layout = METHODS[method]
        n = args.eval_n if method == "EVAL" else args.n
        kedit_hparams = os.path.join(REPO, kedit_hparams)
        if method == "MEMIT" and args.memit_hparams_kedit:
            kedit_hparams = os.path.abspath(args.memit_hparams_kedit)
        if method in OVERRIDES:
            derived = os.path.join(work, f"{method}.kedit.yaml")
            overridden_hparams(kedit_hparams, derived, OVERRIDES[method])
            kedit_hparams = derived
        kedit_data = os.path.join(args.data_dir, records)
        peer_data = kedit_data
        if layout == "knowedit":
            peer_data = os.path.join(work, "flat-" + records)
            run([sys.executable, os.path.join(SHARED, "peer", "tools", "knowedit_to_flat.py"), kedit_data,
                 peer_data], log=log)
        hparams_peer = os.path.join(work, f"{method}.peer.yaml")
        if method == "MEMIT" and args.memit_hparams_peer:
            hparams_peer = args.memit_hparams_peer
        else:
            peer_hparams(kedit_hparams, hparams_peer, model_dir)
        ee_edits, ke_edits, ee_eval, ke_eval = [], [], [], []
        for r in range(args.rounds):
            print(f"[{method}] round {r + 1}/{args.rounds}: EasyEdit", file=sys.stderr, flush=True)
            edits, evals = easyedit_round(args, n, method, work, peer_data, hparams_peer, threads_env, log)
            ee_edits += edits
            if evals is not None:
                ee_eval.append(evals)
            print(f"[{method}] round {r + 1}/{args.rounds}: kedit", file=sys.stderr, flush=True)
            edits, evals = kedit_round(args, n, method, work, kedit_data, kedit_hparams, log, load_s)
            ke_edits += edits
            ke_eval.append(evals)
        ee, ke = statistics.median(ee_edits), statistics.median(ke_edits)
        row = {"method": method, "n": n, "rounds": args.rounds, "threads": args.threads,
               "easyedit_s_per_edit": ee, "kedit_s_per_edit": ke, "ratio": ke / ee}
        if ee_eval and layout == "flat":  # the same metrics both sides only on the flat layout
            row["easyedit_eval_cases_per_s"] = n / statistics.median(ee_eval)
            row["kedit_eval_cases_per_s"] = n / statistics.median(ke_eval)
            row["eval_throughput_ratio"] = row["kedit_eval_cases_per_s"] / row["easyedit_eval_cases_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'method':<8}{'EasyEdit s/edit':>17}{'kedit s/edit':>14}{'ratio':>8}{'eval cases/s (EE / kedit)':>29}")
    for row in rows:
        tput = (f"{row['easyedit_eval_cases_per_s']:.2f} / {row['kedit_eval_cases_per_s']:.2f}"
                if "easyedit_eval_cases_per_s" in row else "-")
        print(f"{row['method']:<8}{row['easyedit_s_per_edit']:>17.2f}{row['kedit_s_per_edit']:>14.2f}"
              f"{row['ratio']:>7.2f}x{tput:>29}")
    print(f"(work folder and full logs: {work})")


if __name__ == "__main__":
    main()
