"""The built-in default model: a ResNet-style EE network on scikit-learn's digits.

Real data that ships with a package (1,797 8x8 handwritten digits, 10
classes), trained offline on first use in seconds and cached under
`cache_dir()/models/digits-resnet-<VERSION>`:

0. a stratified 70/30 train/test split (seed 0); the training part is split
   again 75/25 into a fit set and a validation set;
1. backbone and head are trained end to end on the fit set (AdamW, one-cycle
   learning rate, fixed seed);
2. the backbone is frozen, every ramp's input features are computed once,
   and the ramps are trained on them (DeeBERT's second stage);
3. every exit's temperature is fitted on the validation set: ramps trained on
   the backbone's own training data come out under-confident, each by a
   different factor, and one entropy threshold then means something else at
   every ramp. Folding 1/T into the classifier changes no argmax;
4. the entropy threshold is the loosest one on a grid whose validation
   accuracy is no lower than the head's (E3 must not buy speed with accuracy).
   The test split plays no part in any choice; it only measures.

The held-out test split is saved beside the weights (`testset.safetensors`,
read it with `load_testset`) so that tests, examples and benchmarks draw real
easy and hard inputs from it.

`python3 -m e3.models.digits [--threads 2]` trains or finds the model and
prints its figures: accuracy, exits, and latency per block, ramp and head.

Training runs on one thread so the weights do not depend on the machine's
core count (and so that it degrades gracefully on a busy machine).
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError
from .model_cache import ensure_built
from .evaluation import ExitReport, all_exit_logits, exit_report, fit_temperature, pick_threshold, sweep
from .policies import make_policy
from .registry import MANIFEST, cache_dir, read_weights
from .resnet import ResNetArch, ResNetEE, ResNetNet, save

# Bump when the recipe or the architecture changes: a cached model of another
# version is never reused.
VERSION = "v2"
NAME = "digits-resnet"
SEED = 0
TESTSET = "testset.safetensors"
# Entropy thresholds tried on the validation set: a log grid, since the useful
# range of normalised entropy for calibrated ramps is 0.005..0.3.
THRESHOLDS = [round(float(t), 4) for t in torch.logspace(-2.7, -0.1, 40, dtype=torch.float64)]


@dataclass(frozen=True)
class Recipe:
    """How the default model is trained (recorded in its manifest)."""

    test_fraction: float = 0.3
    val_fraction: float = 0.25         # of the training part
    epochs: int = 20
    batch: int = 64
    lr: float = 5e-3                   # one-cycle peak
    weight_decay: float = 0.05
    ramp_epochs: int = 60
    ramp_lr: float = 1e-2
    threads: int = 1


ARCH = ResNetArch(input_scale=16.0, stem_channels=32,
                  blocks=((32, 1), (32, 1), (64, 2), (64, 1), (64, 1)))


def default_model_dir() -> Path:
    return cache_dir() / "models" / f"{NAME}-{VERSION}"


def ensure_default_model() -> Path:
    """The cached digits model's directory, training it first if needed (model_cache.ensure_built)."""
    return ensure_built(default_model_dir(), train_default)


@dataclass
class DigitsData:
    """The digits split three ways; images as [n, 64] float32 pixel values 0..16."""

    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(recipe: Recipe = Recipe(), seed: int = SEED) -> DigitsData:
    """Stratified train/test, then fit/validation within train (all from scikit-learn, offline)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x, y = data.data.astype("float32"), data.target.astype("int64")
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=recipe.test_fraction, stratify=y,
                                          random_state=seed)
    xfit, xval, yfit, yval = train_test_split(xtr, ytr, test_size=recipe.val_fraction, stratify=ytr,
                                              random_state=seed)
    t = torch.as_tensor
    return DigitsData(t(xfit), t(yfit), t(xval), t(yval), t(xte), t(yte))


def load_testset(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs float32 [n, 64], labels int64 [n]) held out from training, from a model directory."""
    data = read_weights(Path(path) / TESTSET)
    for key in ("inputs", "labels"):
        if key not in data:
            raise CheckpointError(f"{Path(path) / TESTSET}: missing tensor {key!r}")
    return data["inputs"].float(), data["labels"].long()


def train_default(out: Path, recipe: Recipe = Recipe(), seed: int = SEED) -> Path:
    """Train the default model into directory `out` (see the module docstring)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    # fork_rng: seeding must not reset the random state of a process that embeds us;
    # inference_mode(False): the runtime may call us from inside inference mode.
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            data = load_digits_data(recipe, seed)
            net = ResNetNet(ARCH)
            _train_backbone(net, _images(data.x_fit), data.y_fit, recipe, seed)
            _train_ramps(net, _images(data.x_fit), data.y_fit, recipe, seed)
            temperatures = _calibrate(net, _images(data.x_val), data.y_val)
        model = ResNetEE(net.eval(), NAME)
        chosen, test = _choose_threshold(model, data)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    save(model, out, {
        "policy": {"name": "entropy", "threshold": chosen.threshold},
        "trained": {
            "data": f"sklearn load_digits: stratified {1 - recipe.test_fraction:.0%}/{recipe.test_fraction:.0%} "
                    f"train/test split, train split {1 - recipe.val_fraction:.0%}/{recipe.val_fraction:.0%} "
                    f"fit/validation, seed {seed}",
            "rows": {"fit": len(data.y_fit), "validation": len(data.y_val), "test": len(data.y_test)},
            "recipe": asdict(recipe), "seed": seed, "temperatures": temperatures,
            "train_seconds": round(seconds, 2), "torch": torch.__version__,
            "python": platform.python_version(),
            "validation": chosen.to_json(), "test": test.to_json()}})
    from safetensors.torch import save_file
    save_file({"inputs": data.x_test.contiguous(), "labels": data.y_test.contiguous()}, str(out / TESTSET))
    return out


def _images(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, ARCH.in_channels, ARCH.height, ARCH.width)


def _train_backbone(net: ResNetNet, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int) -> None:
    """Stage 1: stem, blocks and head end to end (the ramps are not touched)."""
    params = [p for n, p in net.named_parameters() if not n.startswith("ramps.")]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-len(x) // recipe.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(recipe.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(recipe.batch):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


def _ramp_features(net: ResNetNet, x: torch.Tensor) -> list[torch.Tensor]:
    """What each ramp's classifier sees, for every input, from one pass of the frozen backbone."""
    feats, h, first = [], x, 0
    with torch.no_grad():
        for ramp, block in zip(net.ramps, net.arch.ramp_blocks):
            h = net.run_blocks(first, block, h)
            feats.append(ramp.features(h))
            first = block + 1
    return feats


def _train_ramps(net: ResNetNet, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int) -> None:
    """Stage 2 (DeeBERT): the backbone is frozen, its features computed once."""
    gen = torch.Generator().manual_seed(seed + 1)
    for ramp, f in zip(net.ramps, _ramp_features(net, x)):
        opt = torch.optim.Adam(ramp.parameters(), lr=recipe.ramp_lr)
        for _ in range(recipe.ramp_epochs):
            for idx in torch.randperm(len(f), generator=gen).split(128):
                loss = F.cross_entropy(ramp.fc(f[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()


def _calibrate(net: ResNetNet, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Stage 3: fit each exit's temperature on validation data and fold it into its classifier."""
    with torch.no_grad():
        feats = _ramp_features(net, x)
        feats.append(net.head.features(net.run_blocks(0, len(net.blocks) - 1, x)))
        temps = []
        for exit_, f in zip([*net.ramps, net.head], feats):
            t = fit_temperature(exit_.fc(f), y)
            exit_.fc.weight /= t
            exit_.fc.bias /= t
            temps.append(round(t, 4))
    return temps


def _choose_threshold(model: ResNetEE, data: DigitsData) -> tuple[ExitReport, ExitReport]:
    """(validation report at the chosen threshold, test report at the same threshold)."""
    probe = make_policy("entropy", THRESHOLDS[0])    # all_exit_logits only needs its state fields
    val = sweep(model, all_exit_logits(model, probe, list(data.x_val)), data.y_val, "entropy", THRESHOLDS)
    chosen = pick_threshold(val, max_drop=0.0)
    test = exit_report(model, all_exit_logits(model, probe, list(data.x_test)), data.y_test,
                       make_policy("entropy", chosen.threshold))
    return chosen, test


def _median_s(fn, threads: int) -> float:
    """Median seconds of one call of `fn` (torch.utils.benchmark: warm-up, blocked runs)."""
    from torch.utils.benchmark import Timer
    return Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=0.5).median


def measure_latency(model: ResNetEE, inputs: torch.Tensor, batches=(1, 32), threads: int = 2) -> dict:
    """Per batch size: ms per batch of the whole model (all blocks and the head, no ramps),
    of each block, each ramp and the head, on real inputs."""
    meta, out = model.meta, {}
    with torch.inference_mode():
        for b in batches:
            state = model.encode(list(inputs[:b]))
            last = meta.num_blocks - 1
            row = {"model": _median_s(lambda: model.head(model.run(0, last, state)), threads),
                   "blocks": [], "ramps": []}
            for k in range(meta.num_blocks):
                row["blocks"].append(_median_s(lambda: model.run(k, k, state), threads))
                state = model.run(k, k, state)
                r = meta.ramp_at(k)
                if r is not None:
                    row["ramps"].append(_median_s(lambda: model.ramp(r, state), threads))
            row["head"] = _median_s(lambda: model.head(state), threads)
            out[b] = {k: [v * 1e3 for v in x] if isinstance(x, list) else x * 1e3 for k, x in row.items()}
    return out


def main(argv=None) -> None:
    """`python3 -m e3.models.digits`: train or find the default model and print its figures."""
    import argparse
    import json
    from .evaluation import describe_exits
    from .registry import load_model
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the latency figures")
    args = parser.parse_args(argv)
    path = ensure_default_model()
    trained = json.loads((path / MANIFEST).read_text())["trained"]
    loaded = load_model(path)
    model, policy = loaded.model, loaded.policy
    x, y = load_testset(path)
    r = describe_exits(model, policy, list(x), y)
    params = sum(p.numel() for p in model.net.parameters())
    print(f"{path}\ntrained in {trained['train_seconds']} s ({trained['recipe']['threads']} thread), "
          f"{params} parameters, model.safetensors {(path / 'model.safetensors').stat().st_size} bytes")
    print(f"test ({r.n} digits): head alone {r.head_accuracy:.2%}; EE at {policy.name} {policy.threshold}: "
          f"{r.accuracy:.2%}, {r.mean_blocks:.2f} of {model.meta.num_blocks} blocks on average")
    print("exit fractions", [f"{f:.1%}" for f in r.exit_fraction],
          "accuracy there", [None if a is None else f"{a:.1%}" for a in r.exit_accuracy])
    for b, row in measure_latency(model, x, threads=args.threads).items():
        print(f"batch {b:>2}, {args.threads} threads: model {row['model']:.3f} ms ({row['model'] / b:.3f} ms/sample); "
              f"blocks {[round(v, 3) for v in row['blocks']]} ms; ramps {[round(v, 3) for v in row['ramps']]} ms; "
              f"head {row['head']:.3f} ms")


if __name__ == "__main__":
    main()
