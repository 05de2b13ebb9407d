"""Seconds per ROME edit in EasyEdit (execute_rome: template sampling, u, the value optimisation),
for the first N CounterFact records, on the CPU with T threads, in one process, so the context
templates are sampled by the first edit and reused by the rest, as in an EasyEdit run.
usage: time_rome.py BASELINE_DIR HPARAMS.yaml COUNTERFACT.json N [T]"""
import json, sys, time, types

base, hp_path, data, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 2
sys.path.insert(0, base + "/src")
# Bare package modules, so importing ROME does not run easyeditor's __init__ (every editor, trainer
# and their dependencies).
for name in ["easyeditor", "easyeditor.models"]:
    module = types.ModuleType(name)
    module.__path__ = [base + "/src/" + name.replace(".", "/")]
    sys.modules[name] = module
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# ROME's modules import matplotlib and datasets (plots, the Wikipedia statistics) without needing
# them when mom2_adjustment is false; placeholders after transformers has probed the real ones.
for name in ["matplotlib", "matplotlib.style", "datasets"]:
    module = types.ModuleType(name)
    module.context = module.load_dataset = None
    sys.modules[name] = module
from easyeditor.models.rome import ROMEHyperParams, rome_main

torch.set_num_threads(threads)
torch.manual_seed(0)
model_dir = base + "/smollm2-hf"
tok = AutoTokenizer.from_pretrained(model_dir)
tok.pad_token_id = tok.eos_token_id
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
hp = ROMEHyperParams.from_hparams(hp_path)
hp.model_name = model_dir
seconds = []
for record in json.load(open(data))[:n]:
    request = {k: record[k] for k in ("prompt", "subject", "target_new")}
    start = time.perf_counter()
    rome_main.execute_rome(model, tok, request, hp)
    seconds.append(time.perf_counter() - start)
    print(f"EDIT {len(seconds) - 1} {seconds[-1]:.2f} s", flush=True)
print(json.dumps({"seconds_per_edit": seconds, "mean": sum(seconds) / len(seconds)}))
