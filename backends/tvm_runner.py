"""Load and run a prunec TVM output directory (``model.so`` + ``meta.json``).

``load(OUT)`` returns a callable taking numpy arrays or torch tensors (in the
order of ``meta["inputs"]``) and returning the same kind; ``prunec run`` is
:func:`run_cli`.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from prunec.errors import PrunecError, UsageError


class ArtifactError(PrunecError):
    """A damaged or incompatible output directory."""


def _device_for(meta: dict):
    import tvm
    if meta.get("device") == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise ArtifactError("this library was built for cuda but no CUDA GPU is present here; "
                                "rebuild with --target llvm to run on the CPU")
        return dev
    return tvm.cpu(0)


class TVMModel:
    """A built prunec model: ``model(*inputs)`` -> output (or tuple of outputs)."""

    def __init__(self, lib, meta: dict):
        import tvm
        from tvm import relax
        self.meta = meta
        self.device = _device_for(meta)
        try:
            self.vm = relax.VirtualMachine(lib, self.device)
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"cannot load the library for {meta.get('target')}: "
                                f"{str(e).strip().splitlines()[-1][:200]}") from None
        self._tvm = tvm

    @property
    def input_specs(self) -> list[dict]:
        return self.meta["inputs"]

    def _convert(self, i: int, x):
        spec = self.meta["inputs"][i]
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if list(x.shape) != list(spec["shape"]):
            raise UsageError(f"input {i} ({spec['name']}): shape {list(x.shape)}, the model was compiled "
                             f"for {spec['shape']}")
        if str(x.dtype) != spec["dtype"]:
            raise UsageError(f"input {i} ({spec['name']}): dtype {x.dtype}, the model was compiled "
                             f"for {spec['dtype']}")
        return self._tvm.runtime.tensor(np.ascontiguousarray(x), self.device)

    def run_numpy(self, *inputs) -> list[np.ndarray]:
        if len(inputs) != len(self.meta["inputs"]):
            raise UsageError(f"{len(inputs)} inputs given, the model takes {len(self.meta['inputs'])} "
                             f"({', '.join(s['name'] for s in self.meta['inputs'])})")
        args = [self._convert(i, x) for i, x in enumerate(inputs)]
        out = self.vm["main"](*args)
        return [o.numpy() for o in _flatten(out)]

    def __call__(self, *inputs):
        as_torch = any(hasattr(x, "detach") for x in inputs)
        outs = self.run_numpy(*inputs)
        if as_torch:
            import torch
            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def time(self, *inputs, number: int = 20, repeat: int = 3) -> float:
        """Median seconds per call (TVM's time_evaluator, inputs already on the device)."""
        args = [self._convert(i, x) for i, x in enumerate(inputs)]
        self.vm.set_input("main", *args)
        f = self.vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=repeat)
        return float(np.median(f("main").results))


def _flatten(out) -> list:
    import tvm
    if isinstance(out, (list, tuple)) or type(out).__name__ in ("Array", "ADT", "Tuple"):
        res = []
        for o in out:
            res += _flatten(o)
        return res
    if isinstance(out, tvm.runtime.Tensor):
        return [out]
    return list(out)


def read_meta(outdir: str) -> dict:
    if not os.path.isdir(outdir):
        raise UsageError(f"{outdir}: no such output directory (make one with prunec compile --target llvm)")
    path = os.path.join(outdir, "meta.json")
    if not os.path.exists(path):
        raise ArtifactError(f"{outdir}: no meta.json; not a TVM output directory (compile with --target llvm or cuda)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: damaged ({e})") from None
    if meta.get("format") != "prunec-tvm" or not isinstance(meta.get("inputs"), list):
        raise ArtifactError(f"{path}: not a prunec TVM meta file")
    return meta


def load(outdir: str) -> TVMModel:
    """Load ``OUT`` written by ``prunec compile --target llvm|cuda``."""
    import tvm
    meta = read_meta(outdir)
    so = os.path.join(outdir, "model.so")
    if not os.path.exists(so):
        raise ArtifactError(f"{outdir}: model.so is missing")
    _check_host(meta)
    try:
        lib = tvm.runtime.load_module(so)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{so}: cannot load ({str(e).strip().splitlines()[-1][:200]}); "
                            f"the file is damaged or was built for another machine") from None
    return TVMModel(lib, meta)


def _check_host(meta: dict) -> None:
    """Refuse a library built for a CPU whose instructions this machine lacks."""
    need = meta.get("cpu_features")
    if not need:
        return
    import tvm
    from prunec.backends.tvm_lower import cpu_features, host_cpu
    have = set(cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})))
    missing = [f for f in need if f not in have]
    if missing:
        raise ArtifactError(f"library built for target {meta.get('target')} uses {', '.join(missing)}, which this "
                            f"CPU ({host_cpu()}) lacks; rebuild it for this machine (--target llvm)")


def run_cli(args) -> int:
    model = load(args.outdir)
    arrays = []
    for path in args.input:
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such input file")
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{path}: not a .npy array ({e})") from None
    outs = model.run_numpy(*arrays)
    if args.output:
        if len(outs) == 1:
            np.save(args.output, outs[0])
        else:
            base = args.output[:-4] if args.output.endswith(".npy") else args.output
            for i, o in enumerate(outs):
                np.save(f"{base}.{i}.npy", o)
    else:
        for spec, o in zip(model.meta["outputs"], outs):
            print(f"{spec['name']}: shape {list(o.shape)} {o.dtype}", file=sys.stdout)
            print(np.array2string(o.ravel()[:10], precision=5), file=sys.stdout)
    return 0
