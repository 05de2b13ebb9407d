#!/usr/bin/env python3
"""Compares the float tensors two safetensors files share, name by name: the largest absolute
difference against the largest absolute value of the first file's tensor. Standard library only
(the GPU machines that run scripts/cuda-check.sh may lack numpy).

usage: scripts/compare-safetensors.py A.safetensors B.safetensors"""
import json
import struct
import sys

FORMATS = {"F64": ("d", 8), "F32": ("f", 4)}


def tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
    except (struct.error, ValueError):
        sys.exit(f"{path}: not a safetensors file")
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in FORMATS:
            continue
        code, size = FORMATS[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // size
        out[name] = struct.unpack(f"<{count}{code}", data[base + start : base + end])
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
    shared = sorted(set(a) & set(b))
    if not shared:
        sys.exit(f"{sys.argv[1]} and {sys.argv[2]} share no float tensor")
    for name in shared:
        if len(a[name]) != len(b[name]):
            print(f"{name}: {len(a[name])} against {len(b[name])} elements")
            continue
        diff = max(abs(x - y) for x, y in zip(a[name], b[name]))
        scale = max(abs(x) for x in a[name])
        print(f"{name}: max |a - b| {diff:.6g}, max |a| {scale:.6g}")


if __name__ == "__main__":
    main()
