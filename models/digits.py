"""The built-in default model: a ResNet-style EE network on scikit-learn's digits.

Real data that ships with a package (1,797 8x8 handwritten digits, 10
classes), trained offline on first use in seconds and cached under
`cache_dir()/models/digits-resnet-<version>`:

1. backbone and head are trained end to end (Adam, fixed seed);
2. the backbone is frozen, every ramp's input features are computed once,
   and the ramps are trained on them (DeeBERT's second stage);
3. the entropy threshold is the loosest one whose accuracy on a validation
   split of the training data is no lower than the head's (E3 must not buy
   speed with accuracy).

The held-out 30% test split is saved beside the weights (`testset.safetensors`)
so that tests, examples and benchmarks draw real easy and hard inputs from it.
"""
from __future__ import annotations

import fcntl
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .evaluation import all_exit_logits, exit_report, pick_threshold, sweep
from .policies import make_policy
from .registry import MANIFEST, cache_dir
from .resnet import ResNetArch, ResNetEE, ResNetNet, save

VERSION = "v1"
NAME = "digits-resnet"
SEED = 0
THRESHOLDS = [round(0.02 * i, 2) for i in range(1, 31)]


def default_model_dir() -> Path:
    return cache_dir() / "models" / f"{NAME}-{VERSION}"


def ensure_default_model() -> Path:
    """The cached default model's directory, training it first if needed.

    Safe when several processes start at once: one trains under a file lock
    into a temporary directory and renames it into place; the others wait and
    then find it.
    """
    final = default_model_dir()
    if (final / MANIFEST).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / MANIFEST).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
            try:
                train_default(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


def load_digits_split(seed: int = SEED):
    """(train inputs, train labels, test inputs, test labels): a stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    xtr, xte, ytr, yte = train_test_split(data.data.astype("float32"), data.target, test_size=0.3,
                                          stratify=data.target, random_state=seed)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt)
    return as_t(xtr, torch.float32), as_t(ytr, torch.int64), as_t(xte, torch.float32), as_t(yte, torch.int64)


def train_default(out: Path) -> Path:
    """Train the default model into directory `out` (see the module docstring)."""
    start = time.perf_counter()
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        xtr, ytr, xte, yte = load_digits_split()
        n_val = len(xtr) // 6
        xval, yval, xfit, yfit = xtr[:n_val], ytr[:n_val], xtr[n_val:], ytr[n_val:]
        arch = ResNetArch(input_scale=16.0)
        net = ResNetNet(arch)
        _train_backbone(net, xfit.view(-1, 1, 8, 8), yfit)
        _train_ramps(net, xfit.view(-1, 1, 8, 8), yfit)
        model = ResNetEE(net.eval(), NAME)
        policy_probe = make_policy("entropy", 0.1)
        val = sweep(model, all_exit_logits(model, policy_probe, list(xval)), yval, "entropy", THRESHOLDS)
        chosen = pick_threshold(val, max_drop=0.0)
        test = exit_report(model, all_exit_logits(model, policy_probe, list(xte)), yte,
                           make_policy("entropy", chosen.threshold))
    finally:
        torch.set_num_threads(threads)
    save(model, out, {
        "policy": {"name": "entropy", "threshold": chosen.threshold},
        "trained": {"data": "sklearn load_digits, stratified 70/30 split, seed 0", "seed": SEED,
                    "train_seconds": round(time.perf_counter() - start, 2), "torch": torch.__version__,
                    "python": platform.python_version(), "validation": chosen.to_json(),
                    "test": test.to_json()}})
    from safetensors.torch import save_file
    save_file({"inputs": xte.contiguous(), "labels": yte.contiguous()}, str(out / "testset.safetensors"))
    return out


def _train_backbone(net: ResNetNet, x: torch.Tensor, y: torch.Tensor, epochs: int = 14) -> None:
    params = [p for n, p in net.named_parameters() if not n.startswith("ramps.")]
    opt = torch.optim.Adam(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            h = net.run_blocks(0, len(net.blocks) - 1, x[idx])
            loss = torch.nn.functional.cross_entropy(net.head(h), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()


def _train_ramps(net: ResNetNet, x: torch.Tensor, y: torch.Tensor, epochs: int = 60) -> None:
    """DeeBERT's second stage: the backbone is frozen, its features computed once."""
    with torch.inference_mode():
        feats, h, first = [], x, 0
        for block in net.arch.ramp_blocks:
            h = net.run_blocks(first, block, h)
            feats.append(h.mean(dim=(2, 3)).clone())
            first = block + 1
    gen = torch.Generator().manual_seed(SEED + 1)
    for ramp, f in zip(net.ramps, feats):
        opt = torch.optim.Adam(ramp.parameters(), lr=1e-2)
        for _ in range(epochs):
            for idx in torch.randperm(len(f), generator=gen).split(128):
                loss = torch.nn.functional.cross_entropy(ramp.fc(f[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
