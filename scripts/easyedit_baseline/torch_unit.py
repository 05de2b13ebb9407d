#!/usr/bin/env python3
"""PyTorch's side of `cargo bench --bench train_step`: the same three units of work on the same
SmolLM2 (the float32 Hugging Face folder ../shared/peer/convert_gguf.py writes), the same token ids,
median milliseconds of 20 runs after 3 warm-ups. Run it in the same sitting as the bench.

  forward_16     one forward of 16 tokens (PyTorch computes logits at every position; kedit at one)
  ft_l_step_16   forward + backward of -log p(token 42) at the last position, gradient of layer 5's
                 down_proj only (FT-L's step)
  mend_step_16   the same loss, gradients of the last three layers' MLP weights (MEND's unit)
  forward_8x32   one forward of 8 x 32 tokens (`cargo bench --bench forward`)

usage: $PEER_DIR/venv/bin/python scripts/easyedit_baseline/torch_unit.py $PEER_DIR/smollm2-135m-hf [THREADS]
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ids = torch.tensor([[100 + 11 * t for t in range(16)]])
batch = torch.tensor([[100 + 37 * b + 11 * t for t in range(32)] for b in range(8)])
for p in model.parameters():
    p.requires_grad_(False)


def median_ms(f, runs=20):
    for _ in range(3):
        f()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def forward(x):
    with torch.no_grad():
        return model(x).logits


def step():
    loss = -torch.log_softmax(model(ids).logits[0, -1], -1)[42]
    loss.backward()
    model.zero_grad(set_to_none=True)


print("torch", torch.__version__, "threads", torch.get_num_threads())
print(f"forward_16     {median_ms(lambda: forward(ids)):8.1f} ms")
down = model.model.layers[5].mlp.down_proj.weight
down.requires_grad_(True)
print(f"ft_l_step_16   {median_ms(step):8.1f} ms")
down.requires_grad_(False)
for layer in model.model.layers[27:30]:
    for p in layer.mlp.parameters():
        p.requires_grad_(True)
print(f"mend_step_16   {median_ms(step):8.1f} ms")
for p in model.parameters():
    p.requires_grad_(False)
print(f"forward_8x32   {median_ms(lambda: forward(batch), runs=5):8.1f} ms")
