"""Writes tensors in torch.save's zip format without torch, for kedit's tests.

torch.save(t, f) writes a zip holding `<name>/data.pkl` (a protocol-2 pickle calling
torch._utils._rebuild_tensor_v2 on a persistent storage id), the storage bytes as
`<name>/data/<key>`, and `<name>/version`. The pickle is produced by Python's own pickler with
stand-ins registered under torch's module names, so it carries exactly the opcodes torch's
pickler would (GLOBAL, BINPERSID, REDUCE).

    python3 make_pt.py OUT_DIR
"""

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile


def stand_in(module, name):
    mod = sys.modules.setdefault(module, types.ModuleType(module))

    def fn(*args):
        raise RuntimeError("stand-in")

    fn.__module__ = module
    fn.__qualname__ = name
    fn.__name__ = name
    setattr(mod, name, fn)
    return fn


rebuild_tensor_v2 = stand_in("torch._utils", "_rebuild_tensor_v2")


class FloatStorage:
    pass


torch_mod = sys.modules.setdefault("torch", types.ModuleType("torch"))
FloatStorage.__module__ = "torch"
torch_mod.FloatStorage = FloatStorage


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for dim in reversed(self.shape):
            stride.insert(0, acc)
            acc *= dim
        return (
            rebuild_tensor_v2,
            (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()),
        )


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def save(obj, storages, path, archive="archive"):
    """`obj`: a Tensor or a dict of them; `storages`: key -> list of float32 values."""
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", buf.getvalue())
        z.writestr(f"{archive}/byteorder", "little")
        for key, values in storages.items():
            z.writestr(f"{archive}/data/{key}", struct.pack(f"<{len(values)}f", *values))
        z.writestr(f"{archive}/version", "3\n")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    # A [2, 3, 4] tensor holding 0.5 * i at flat index i.
    values = [0.5 * i for i in range(24)]
    save(Tensor(Storage("0", 24), [2, 3, 4]), {"0": values}, os.path.join(out, "arange-2x3x4.pt"))
    # AlphaEdit projectors for the tiny GPT-2 (one layer, d_ff = 128): all zero, so no update passes.
    d_ff = 128
    save(
        Tensor(Storage("0", d_ff * d_ff), [1, d_ff, d_ff]),
        {"0": [0.0] * (d_ff * d_ff)},
        os.path.join(out, "zero-projector-1x128x128.pt"),
    )


if __name__ == "__main__":
    main()
