#!/usr/bin/env python3
"""Writes a Hugging Face model folder with random weights in the real shapes of a benchmark model.

kedit's benchmark models (GPT2-XL, LLaMA-2-7B) cannot be downloaded here, and what a size test
measures is arithmetic and memory, not knowledge: this writes the same tensors, names, dtypes,
shard layout (`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`) and
`config.json` values as the published checkpoints, filled with seeded normal noise.

  python3 scripts/make-shaped-checkpoint.py --arch gpt2-xl --out /data/gpt2-xl-shaped
  python3 scripts/make-shaped-checkpoint.py --arch llama-2-7b --out /data/llama-2-7b-shaped

Tokenizers: GPT-2's own (tests/fixtures/tiny-gpt2); LLaMA-2's SentencePiece tokenizer is not
available here, so the LLaMA folder gets SmolLM2's byte-level BPE cut to LLaMA-2's 32,000 ids (the
merges that would make a later id are dropped, so every id it emits exists in the embedding).
Needs numpy only. Not part of CI: GPT2-XL is 6.2 GB in f32, LLaMA-2-7B 13.5 GB in bf16.
"""

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

# Values of the published config.json files (openai-community/gpt2-xl, meta-llama/Llama-2-7b-hf).
CONFIGS = {
    "gpt2-xl": {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_embd": 1600, "n_head": 25, "n_layer": 48, "n_positions": 1024, "n_ctx": 1024,
        "n_inner": None, "vocab_size": 50257, "layer_norm_epsilon": 1e-05,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
        "scale_attn_weights": True, "initializer_range": 0.02,
    },
    "llama-2-7b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_key_value_heads": 32, "num_hidden_layers": 32, "max_position_embeddings": 4096,
        "vocab_size": 32000, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    },
    "smollm2-135m": None,  # the fixture's config.json, unchanged
}
DEFAULT_DTYPE = {"gpt2-xl": "f32", "llama-2-7b": "bf16", "smollm2-135m": "f32"}


def gpt2_tensors(c):
    d, v, p, layers = c["n_embd"], c["vocab_size"], c["n_positions"], c["n_layer"]
    yield "transformer.wte.weight", (v, d), "normal"
    yield "transformer.wpe.weight", (p, d), "normal"
    for i in range(layers):
        h = f"transformer.h.{i}"
        yield f"{h}.ln_1.weight", (d,), "ones"
        yield f"{h}.ln_1.bias", (d,), "zeros"
        # Conv1D stores [in, out].
        yield f"{h}.attn.c_attn.weight", (d, 3 * d), "normal"
        yield f"{h}.attn.c_attn.bias", (3 * d,), "zeros"
        yield f"{h}.attn.c_proj.weight", (d, d), "residual"
        yield f"{h}.attn.c_proj.bias", (d,), "zeros"
        yield f"{h}.ln_2.weight", (d,), "ones"
        yield f"{h}.ln_2.bias", (d,), "zeros"
        yield f"{h}.mlp.c_fc.weight", (d, 4 * d), "normal"
        yield f"{h}.mlp.c_fc.bias", (4 * d,), "zeros"
        yield f"{h}.mlp.c_proj.weight", (4 * d, d), "residual"
        yield f"{h}.mlp.c_proj.bias", (d,), "zeros"
    yield "transformer.ln_f.weight", (d,), "ones"
    yield "transformer.ln_f.bias", (d,), "zeros"


def llama_tensors(c):
    d, f, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    head = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    yield "model.embed_tokens.weight", (v, d), "normal"
    for i in range(layers):
        h = f"model.layers.{i}"
        yield f"{h}.input_layernorm.weight", (d,), "ones"
        yield f"{h}.self_attn.q_proj.weight", (d, d), "normal"
        yield f"{h}.self_attn.k_proj.weight", (kv, d), "normal"
        yield f"{h}.self_attn.v_proj.weight", (kv, d), "normal"
        yield f"{h}.self_attn.o_proj.weight", (d, d), "residual"
        yield f"{h}.post_attention_layernorm.weight", (d,), "ones"
        yield f"{h}.mlp.gate_proj.weight", (f, d), "normal"
        yield f"{h}.mlp.up_proj.weight", (f, d), "normal"
        yield f"{h}.mlp.down_proj.weight", (d, f), "residual"
    yield "model.norm.weight", (d,), "ones"
    if not c.get("tie_word_embeddings", False):
        yield "lm_head.weight", (v, d), "normal"


def fill(rng, shape, kind, layers):
    if kind == "ones":
        return np.ones(shape, np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    # GPT-2's initialisation: std 0.02, residual projections scaled by 1/sqrt(2 * layers), so the
    # residual stream keeps a sensible scale through every layer.
    std = 0.02 / np.sqrt(2 * layers) if kind == "residual" else 0.02
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    return a


def to_bytes(a, dtype):
    if dtype == "f32":
        return a.astype("<f4", copy=False).tobytes()
    bits = a.astype("<f4", copy=False).view("<u4")
    if dtype == "bf16":
        # round to nearest even, as torch's float -> bfloat16 conversion does (no NaNs here)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
        return (rounded >> 16).astype("<u2").tobytes()
    if dtype == "f16":
        return a.astype("<f2").tobytes()
    raise ValueError(dtype)


ST_DTYPE = {"f32": "F32", "bf16": "BF16", "f16": "F16"}
ITEM = {"f32": 4, "bf16": 2, "f16": 2}


def write_shard(path, entries, dtype):
    """entries: (name, shape, bytes) in order; writes one safetensors file atomically."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, data in entries:
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, data in entries:
            f.write(data)
    os.replace(tmp, path)


def llama_tokenizer(vocab_size):
    """SmolLM2's BPE restricted to ids below vocab_size."""
    with open(os.path.join(FIXTURES, "smollm2", "tokenizer.json")) as f:
        tok = json.load(f)
    model = tok["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < vocab_size}
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in vocab and b in vocab and (a + b) in vocab:
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges
    tok["added_tokens"] = [t for t in tok.get("added_tokens", []) if t["id"] < vocab_size]
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=sorted(ST_DTYPE))
    ap.add_argument("--max-shard-gb", type=float, default=5.0,
                    help="largest shard, as transformers' save_pretrained (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dtype = args.dtype or DEFAULT_DTYPE[args.arch]
    if os.path.exists(args.out):
        sys.exit(f"make-shaped-checkpoint: {args.out} exists; refusing to overwrite it")
    work = args.out + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    if args.arch == "smollm2-135m":
        with open(os.path.join(FIXTURES, "smollm2", "config.json")) as f:
            config = json.load(f)
        tensors = llama_tensors(config)
        layers = config["num_hidden_layers"]
        shutil.copy(os.path.join(FIXTURES, "smollm2", "tokenizer.json"), work)
    elif args.arch == "gpt2-xl":
        config = dict(CONFIGS["gpt2-xl"])
        tensors = gpt2_tensors(config)
        layers = config["n_layer"]
        shutil.copy(os.path.join(FIXTURES, "tiny-gpt2", "tokenizer.json"), work)
    else:
        config = dict(CONFIGS["llama-2-7b"])
        tensors = llama_tensors(config)
        layers = config["num_hidden_layers"]
        with open(os.path.join(work, "tokenizer.json"), "w") as f:
            json.dump(llama_tokenizer(config["vocab_size"]), f, ensure_ascii=False)
    config["torch_dtype"] = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
    config["kedit_note"] = "random weights in the real shapes (scripts/make-shaped-checkpoint.py)"
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    rng = np.random.default_rng(args.seed)
    limit = int(args.max_shard_gb * 1e9)
    shards, current, size = [], [], 0
    for name, shape, kind in tensors:
        nbytes = int(np.prod(shape)) * ITEM[dtype]
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, kind))
        size += nbytes
    shards.append(current)

    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = []
        for name, shape, kind in shard:
            data = to_bytes(fill(rng, shape, kind, layers), dtype)
            entries.append((name, shape, data))
            weight_map[name] = fname
            total += len(data)
        write_shard(os.path.join(work, fname), entries, dtype)
        print(f"{fname}: {len(shard)} tensors, {sum(len(e[2]) for e in entries) / 1e9:.2f} GB",
              file=sys.stderr)
    with open(os.path.join(work, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(work, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
