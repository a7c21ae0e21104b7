"""A BranchyNet-style residual network family, in plain torch (no torchvision).

Block 0 is the stem (input scaling, a 3x3 convolution) plus the first
residual block; every further block is one residual block (two 3x3
convolutions and a skip). A ramp may follow any block but the last; a ramp
and the head are the same small module: global average pool, then a linear
classifier. That keeps a ramp's cost a few hundred multiply-adds next to a
block's hundreds of thousands, which is what makes exiting early pay, and it
lets the ramps be trained on pooled features cached once (DeeBERT's second
stage, see digits.py).

GroupNorm rather than BatchNorm: it normalises each sample on its own, so a
row's result never depends on the other rows of its batch (merging survivors
of different batches must not change any answer) and train/eval modes agree.

On disk (family "resnet"): `e3-model.json` with an "arch" object (the fields
of ResNetArch) and `model.safetensors` holding every weight.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .base import EarlyExitModel, InputKind, ModelMeta
from .errors import CheckpointError, InvalidInputError
from .registry import read_weights, write_manifest
from .state import BatchState, FieldSpec, StateSpec

WEIGHTS = "model.safetensors"
FAMILY = "resnet"


@dataclass(frozen=True)
class ResNetArch:
    """The shape of a residual EE network.

    `blocks` lists one (channels, stride) pair per EE block, so the manifest
    says exactly where each block boundary lies; `from_stages` builds it from
    the usual ResNet description (stages of equal-width blocks).
    """

    in_channels: int = 1
    height: int = 8
    width: int = 8
    input_scale: float = 1.0                       # inputs are divided by this (digits: 16)
    stem_channels: int = 32
    blocks: tuple[tuple[int, int], ...] = ((32, 1), (32, 1), (64, 2), (64, 1), (64, 1))
    ramp_blocks: tuple[int, ...] | None = None     # None: after every block but the last
    num_classes: int = 10
    groups: int = 8                                # GroupNorm groups; must divide every width
    ramp_pool: int = 1                             # a ramp pools to ramp_pool x ramp_pool cells (head: 1)

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(tuple(int(v) for v in b) for b in self.blocks))
        if self.ramp_blocks is None:
            object.__setattr__(self, "ramp_blocks", tuple(range(len(self.blocks) - 1)))
        object.__setattr__(self, "ramp_blocks", tuple(int(b) for b in self.ramp_blocks))
        self._validate()

    def _validate(self) -> None:
        for name in ("in_channels", "height", "width", "stem_channels", "num_classes", "groups", "ramp_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"resnet arch: {name} must be at least 1, got {getattr(self, name)!r}")
        if not self.input_scale > 0:
            raise ValueError(f"resnet arch: input_scale must be positive, got {self.input_scale!r}")
        if not self.blocks:
            raise ValueError("resnet arch: blocks is empty; a model needs at least one block")
        for i, b in enumerate(self.blocks):
            if len(b) != 2 or b[0] < 1 or b[1] not in (1, 2):
                raise ValueError(f"resnet arch: block {i} must be (channels >= 1, stride 1 or 2), got {b!r}")
        for c in (self.stem_channels, *(c for c, _ in self.blocks)):
            if c % self.groups:
                raise ValueError(f"resnet arch: width {c} is not divisible by groups={self.groups}")
        rb = self.ramp_blocks
        if list(rb) != sorted(set(rb)) or (rb and (rb[0] < 0 or rb[-1] >= len(self.blocks) - 1)):
            raise ValueError(f"resnet arch: ramp_blocks must increase strictly within "
                             f"0..{len(self.blocks) - 2}, got {rb!r}")

    @staticmethod
    def from_stages(stages: Sequence[tuple[int, int, int]], **fields) -> "ResNetArch":
        """An arch from (channels, number of blocks, stride of the stage's first block) per stage."""
        blocks = [(c, stride if i == 0 else 1) for c, n, stride in stages for i in range(n)]
        return ResNetArch(blocks=tuple(blocks), **fields)

    @staticmethod
    def from_json(d: Any) -> "ResNetArch":
        """The arch recorded in a manifest; CheckpointError says what is wrong with it."""
        if not isinstance(d, dict):
            raise CheckpointError(f"resnet manifest: 'arch' must be an object, got {d!r}")
        try:
            return ResNetArch(**d)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"resnet manifest: bad 'arch' ({exc})") from None

    def to_json(self) -> dict:
        return asdict(self)

    def shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of the state after each block (3x3 convolutions, padding 1)."""
        h, w, out = self.height, self.width, []
        for c, stride in self.blocks:
            h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
            out.append((c, h, w))
        return out


class ResidualBlock(nn.Module):
    """A basic ResNet block: conv-norm-relu, conv-norm, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.skip(x))


class Exit(nn.Module):
    """A ramp or the head: average pool to pool x pool cells, then a linear classifier."""

    def __init__(self, channels: int, classes: int, pool: int = 1):
        super().__init__()
        self.pool = pool
        self.fc = nn.Linear(channels * pool * pool, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier sees; ramp training caches exactly this."""
        if self.pool == 1:
            return x.mean(dim=(2, 3))
        return nn.functional.adaptive_avg_pool2d(x, self.pool).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ResNetNet(nn.Module):
    """The torch modules of a ResNetArch (trainable end to end)."""

    def __init__(self, arch: ResNetArch):
        super().__init__()
        self.arch = arch
        self.stem = nn.Sequential(nn.Conv2d(arch.in_channels, arch.stem_channels, 3, 1, 1, bias=False),
                                  nn.GroupNorm(arch.groups, arch.stem_channels), nn.ReLU())
        cins = [arch.stem_channels] + [c for c, _ in arch.blocks[:-1]]
        self.blocks = nn.ModuleList(ResidualBlock(cin, c, s, arch.groups)
                                    for cin, (c, s) in zip(cins, arch.blocks))
        self.ramps = nn.ModuleList(Exit(arch.blocks[b][0], arch.num_classes, arch.ramp_pool)
                                   for b in arch.ramp_blocks)
        self.head = Exit(arch.blocks[-1][0], arch.num_classes)

    def run_blocks(self, first: int, last: int, x: torch.Tensor) -> torch.Tensor:
        if first == 0:
            x = self.stem(x / self.arch.input_scale)
        for block in self.blocks[first:last + 1]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain (no-exit) network: every block, then the head."""
        return self.head(self.run_blocks(0, len(self.blocks) - 1, x))


class ResNetEE(EarlyExitModel):
    """The ResNet family behind the EE model interface (eval mode, float32)."""

    def __init__(self, net: ResNetNet, name: str = "resnet", labels: Sequence[str] | None = None):
        self.net = net.eval()
        a = net.arch
        labels = tuple(str(v) for v in labels) if labels else tuple(str(i) for i in range(a.num_classes))
        self._input_shape = (a.in_channels, a.height, a.width)
        self._accepted = {(a.in_channels * a.height * a.width,), self._input_shape}
        if a.in_channels == 1:
            self._accepted.add((a.height, a.width))
        hidden = lambda shape: StateSpec((FieldSpec("hidden", shape, torch.float32),))
        self.meta = ModelMeta(
            name=name, family=FAMILY, num_blocks=len(a.blocks), ramp_blocks=a.ramp_blocks,
            num_classes=a.num_classes, labels=labels, input_kind=InputKind.TENSOR,
            input_shape=self._input_shape, input_spec=hidden(self._input_shape),
            boundary_specs=tuple(hidden(s) for s in a.shapes()))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device):
        self.net.to(device)
        return self

    def encode(self, inputs: Sequence) -> BatchState:
        try:
            n = len(inputs)
        except TypeError:
            raise InvalidInputError(
                f"inputs must be a sequence of samples, got {type(inputs).__name__}") from None
        if n == 0:
            raise InvalidInputError("no inputs given")
        rows = [self._encode_one(i, x) for i, x in enumerate(inputs)]
        return BatchState({"hidden": torch.stack(rows).to(self.device)})

    def _encode_one(self, i: int, x: Any) -> torch.Tensor:
        expected = self._input_shape
        flat = expected[0] * expected[1] * expected[2]
        try:
            t = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InvalidInputError(f"input {i} is not numeric: {_short(x)} ({exc}); expected "
                                    f"{flat} numbers or shape {expected}") from None
        if tuple(t.shape) not in self._accepted:
            raise InvalidInputError(f"input {i} has shape {tuple(t.shape)}; expected {expected} "
                                    f"or {flat} values")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).flatten().nonzero()[0])
            raise InvalidInputError(f"input {i} holds NaN or infinite values "
                                    f"(value {bad} is {t.flatten()[bad].item()})")
        return t.reshape(expected)

    def run(self, first, last, state):
        self.meta.check_block_range(first, last)
        return state.replace(hidden=self.net.run_blocks(first, last, state["hidden"]))

    def ramp(self, k, state):
        self.meta.check_ramp(k)
        return self.net.ramps[k](state["hidden"])

    def head(self, state):
        return self.net.head(state["hidden"])


def _short(x: Any, limit: int = 40) -> str:
    """A bounded repr for error messages (a request may carry megabytes)."""
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


def save(model: ResNetEE, path: str | Path, manifest_extra: dict | None = None) -> Path:
    """Write the model directory `path`: manifest (arch, name, labels, extras) and weights."""
    from safetensors.torch import save_file
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(root / WEIGHTS))
    write_manifest(root, {"family": FAMILY, "name": model.meta.name, "labels": list(model.meta.labels),
                          "arch": model.net.arch.to_json(), **(manifest_extra or {})})
    return root


def load(path: Path, manifest: dict) -> ResNetEE:
    """The registry's loader for family "resnet" (safetensors only, never pickle)."""
    arch = ResNetArch.from_json(manifest.get("arch"))
    file = Path(path) / WEIGHTS
    weights = read_weights(file)
    net = ResNetNet(arch)
    _check_weights(file, net.state_dict(), weights)
    net.load_state_dict(weights)
    return ResNetEE(net, manifest.get("name", FAMILY), manifest.get("labels"))


def _check_weights(file: Path, expected: dict, got: dict) -> None:
    """CheckpointError naming the first tensor that is missing, extra, or of the wrong shape."""
    missing = [k for k in expected if k not in got]
    if missing:
        raise CheckpointError(f"{file}: missing tensor {missing[0]!r} ({len(missing)} missing in all); "
                              f"does the manifest's arch match the weights?")
    extra = [k for k in got if k not in expected]
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor {extra[0]!r} ({len(extra)} in all) "
                              f"for the manifest's arch")
    for k, t in expected.items():
        if tuple(got[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{file}: tensor {k!r} has shape {tuple(got[k].shape)}, "
                                  f"the manifest's arch needs {tuple(t.shape)}")
        if not got[k].is_floating_point():
            raise CheckpointError(f"{file}: tensor {k!r} has dtype {got[k].dtype}, expected floating point")
