"""Writes a GGUF model as a float32 Hugging Face folder. usage: to_hf.py MODEL.gguf OUT_DIR"""
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = sys.argv[1], sys.argv[2]
folder, name = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).save_pretrained(out)
