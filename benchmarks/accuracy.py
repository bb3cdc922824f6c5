"""Post-training compression accuracy on real data, no downloads.

Trains a small MLP and a small CNN on scikit-learn's bundled digits and on
MNIST-1D (generated locally by ``mnist1d.data.make_dataset()`` with its default
arguments), then compiles each with every compression pass at a few strengths
(no fine-tuning) and prints test accuracy and stored size against the dense
model as a markdown table.

    python benchmarks/accuracy.py [--out table.md] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

import prunec

# every model names its classifier ``head``; low-rank leaves it whole (rank < classes hurts most)
PIPELINES = [
    "prune-weights{ratio=0.5}", "prune-weights{ratio=0.8}", "prune-weights{ratio=0.9}",
    "prune-weights{ratio=0.9,scope=global}",
    "prune-nm{n=2,m=4}", "prune-nm{n=1,m=4}",
    "prune-blocks{block=1x4,ratio=0.5}", "prune-blocks{block=4x4,ratio=0.75}",
    "share-weights{bits=4}", "share-weights{bits=3}", "share-weights{bits=2,granularity=per-channel}",
    "lowrank{params-ratio=0.5,skip=[head]}", "lowrank{params-ratio=0.25,skip=[head]}",
    "lowrank{params-ratio=0.25,skip=[head],mode=activation}",
    "prune-weights{ratio=0.5},share-weights{bits=4}", "deep-compression",
    "prune-nm,share-weights{bits=4,granularity=per-channel}",
    "lowrank{params-ratio=0.5,skip=[head],mode=activation},prune-weights{ratio=0.5},share-weights{bits=4}",
]


# ---- data ---------------------------------------------------------------------------

def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, random_state=0, stratify=d.target)
    return _tensors(xtr, ytr, xte, yte)


def mnist1d():
    from mnist1d.data import make_dataset
    d = make_dataset()  # default arguments: generated locally, never downloaded
    return _tensors(d["x"].astype(np.float32)[:, None], d["y"], d["x_test"].astype(np.float32)[:, None],
                    d["y_test"])


def _tensors(xtr, ytr, xte, yte):
    return (torch.from_numpy(xtr), torch.from_numpy(np.asarray(ytr)).long(),
            torch.from_numpy(xte), torch.from_numpy(np.asarray(yte)).long())


# ---- models -------------------------------------------------------------------------

def _named(*layers):
    """nn.Sequential whose last layer is called ``head``."""
    names = [str(i) for i in range(len(layers) - 1)] + ["head"]
    return nn.Sequential(OrderedDict(zip(names, layers)))


def mlp(shape):
    n = int(np.prod(shape))
    return _named(nn.Flatten(), nn.Linear(n, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn(shape):
    if len(shape) == 3:  # digits: 1 x 8 x 8
        return _named(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    return _named(nn.Conv1d(1, 32, 5, stride=2, padding=2), nn.ReLU(), nn.Conv1d(32, 64, 3, padding=1),
                  nn.ReLU(), nn.Conv1d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                  nn.Linear(64 * 20, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model, xtr, ytr, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 128):
            idx = perm[i: i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


# ---- the benchmark ------------------------------------------------------------------

def run(quick: bool = False) -> str:
    rows = ["| data | model | pipeline | test acc. | vs dense | stored bytes | compression |",
            "|---|---|---|---:|---:|---:|---:|"]
    pipelines = PIPELINES[:4] if quick else PIPELINES
    for data_name, load, epochs in (("digits", digits, 20), ("mnist1d", mnist1d, 30)):
        xtr, ytr, xte, yte = load()
        calib = xtr[:256]  # calibration batch for the activation-aware mode
        for model_name, build in (("MLP", mlp), ("CNN", cnn)):
            t0 = time.time()
            dense = train(build(tuple(xtr.shape[1:])), xtr, ytr, 5 if quick else epochs)
            base = accuracy(dense, xte, yte)
            nbytes = sum(p.numel() * p.element_size() for p in dense.parameters())
            rows.append(f"| {data_name} | {model_name} | (dense) | {base:.3f} | | {nbytes:,} | 1.00x |")
            print(f"{data_name}/{model_name}: dense {base:.3f} ({time.time() - t0:.1f}s)", file=sys.stderr)
            for text in pipelines:
                r = prunec.compile(copy.deepcopy(dense), (calib,), passes=text)
                if r.module is None:
                    raise RuntimeError(f"{text}: {r.module_problems}")
                acc = accuracy(r.module, xte, yte)
                after = r.report["after"]["bytes"]
                rows.append(f"| {data_name} | {model_name} | `{text}` | {acc:.3f} | {acc - base:+.3f} | "
                            f"{after:,} | {r.report['ratios']['bytes']:.2f}x |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and pipelines (a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    table = run(args.quick)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
