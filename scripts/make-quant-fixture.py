#!/usr/bin/env python3
"""Writes tests/fixtures/quant/: a small f32 matrix and its bytes in each block type llama.cpp's
gguf-py quantises (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), the independent reference kedit's quantised GGUF
export is checked against. Needs the `gguf` and `numpy` packages (gguf 0.17.1 made the files in
the repository). Usage: scripts/make-quant-fixture.py [OUT_DIR]"""
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/quant")
out.mkdir(parents=True, exist_ok=True)
rows, cols = 6, 64
i = np.arange(rows * cols, dtype=np.float32)
matrix = (np.sin(0.37 * i + 0.1) * 0.5).reshape(rows, cols).astype(np.float32)
matrix[1, :32] = 0.0  # an all-zero block
matrix[2, 5] = 7.25  # an outlier that sets its block's scale
matrix[3, 32:] = -np.abs(matrix[3, 32:])  # a block of one sign
matrix.tofile(out / "matrix-6x64.f32")
for name in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]:
    qtype = GGMLQuantizationType[name]
    quants.quantize(matrix, qtype).tofile(out / f"matrix-6x64.{name.lower()}")
print("wrote", out)
