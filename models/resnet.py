"""A BranchyNet-style residual network family, in plain torch (no torchvision).

Block 0 is the stem (input scaling, a 3x3 convolution) plus the first
residual block; every further block is one residual block. A ramp (global
average pool, then a linear classifier) may follow any block but the last;
the head has the same shape after the last block.

GroupNorm rather than BatchNorm: it normalises each sample on its own, so a
row's result never depends on the other rows of its batch (merging survivors
of different batches must not change any answer).

On disk (family "resnet"): `e3-model.json` with an "arch" object and
`model.safetensors` holding every weight.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .base import EarlyExitModel, InputKind, ModelMeta
from .errors import CheckpointError, InvalidInputError
from .registry import read_weights, write_manifest
from .state import BatchState, FieldSpec, StateSpec

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ResNetArch:
    """The shape of a residual EE network."""

    in_channels: int = 1
    height: int = 8
    width: int = 8
    input_scale: float = 1.0                       # inputs are divided by this (digits: 16)
    stem_channels: int = 32
    blocks: tuple[tuple[int, int], ...] = ((32, 1), (32, 1), (64, 2), (64, 1), (64, 1))  # (channels, stride)
    ramp_blocks: tuple[int, ...] = (0, 1, 2, 3)
    num_classes: int = 10
    groups: int = 8

    @staticmethod
    def from_json(d: dict) -> "ResNetArch":
        try:
            d = dict(d)
            d["blocks"] = tuple(tuple(b) for b in d["blocks"])
            d["ramp_blocks"] = tuple(d["ramp_blocks"])
            return ResNetArch(**d)
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"bad resnet 'arch' in manifest: {exc}") from None

    def to_json(self) -> dict:
        return asdict(self)

    def shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of the state after each block."""
        h, w, out = self.height, self.width, []
        for c, stride in self.blocks:
            h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
            out.append((c, h, w))
        return out


class ResidualBlock(nn.Module):
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
    """A ramp or the head: global average pool, then a linear classifier."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResNetNet(nn.Module):
    """The torch modules of a ResNetArch (trainable end to end)."""

    def __init__(self, arch: ResNetArch):
        super().__init__()
        self.arch = arch
        self.stem = nn.Sequential(nn.Conv2d(arch.in_channels, arch.stem_channels, 3, 1, 1, bias=False),
                                  nn.GroupNorm(arch.groups, arch.stem_channels), nn.ReLU())
        cins = [arch.stem_channels] + [c for c, _ in arch.blocks[:-1]]
        self.blocks = nn.ModuleList(ResidualBlock(cin, c, s, arch.groups) for cin, (c, s) in zip(cins, arch.blocks))
        self.ramps = nn.ModuleList(Exit(arch.blocks[b][0], arch.num_classes) for b in arch.ramp_blocks)
        self.head = Exit(arch.blocks[-1][0], arch.num_classes)

    def run_blocks(self, first: int, last: int, x: torch.Tensor) -> torch.Tensor:
        if first == 0:
            x = self.stem(x / self.arch.input_scale)
        for block in self.blocks[first:last + 1]:
            x = block(x)
        return x


class ResNetEE(EarlyExitModel):
    """The ResNet family behind the EE model interface."""

    def __init__(self, net: ResNetNet, name: str = "resnet", labels: Sequence[str] | None = None):
        self.net = net.eval()
        a = net.arch
        labels = tuple(labels or (str(i) for i in range(a.num_classes)))
        self._input_shape = (a.in_channels, a.height, a.width)
        self.meta = ModelMeta(
            name=name, family="resnet", num_blocks=len(a.blocks), ramp_blocks=a.ramp_blocks,
            num_classes=a.num_classes, labels=labels, input_kind=InputKind.TENSOR,
            input_shape=self._input_shape,
            input_spec=StateSpec((FieldSpec("hidden", self._input_shape, torch.float32),)),
            boundary_specs=tuple(StateSpec((FieldSpec("hidden", s, torch.float32),)) for s in a.shapes()))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device):
        self.net.to(device)
        return self

    def encode(self, inputs: Sequence) -> BatchState:
        if len(inputs) == 0:
            raise InvalidInputError("no inputs given")
        rows = [self._encode_one(i, x) for i, x in enumerate(inputs)]
        return BatchState({"hidden": torch.stack(rows).to(self.device)})

    def _encode_one(self, i: int, x) -> torch.Tensor:
        try:
            t = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidInputError(f"input {i} is not numeric") from None
        expected = self._input_shape
        if t.numel() != expected[0] * expected[1] * expected[2] or t.dim() > 3:
            raise InvalidInputError(f"input {i} has shape {tuple(t.shape)}; expected {expected} "
                                    f"or {expected[0] * expected[1] * expected[2]} values")
        if not torch.isfinite(t).all():
            raise InvalidInputError(f"input {i} holds NaN or infinite values")
        return t.reshape(expected)

    def run(self, first, last, state):
        self.meta.check_block_range(first, last)
        return state.replace(hidden=self.net.run_blocks(first, last, state["hidden"]))

    def ramp(self, k, state):
        self.meta.check_ramp(k)
        return self.net.ramps[k](state["hidden"])

    def head(self, state):
        return self.net.head(state["hidden"])


def save(model: ResNetEE, path: str | Path, manifest_extra: dict | None = None) -> Path:
    """Write the model directory: manifest and weights."""
    from safetensors.torch import save_file
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(root / WEIGHTS))
    write_manifest(root, {"family": "resnet", "name": model.meta.name, "labels": list(model.meta.labels),
                          "arch": model.net.arch.to_json(), **(manifest_extra or {})})
    return root


def load(path: Path, manifest: dict) -> ResNetEE:
    """The registry's loader for family "resnet" (safetensors only, never pickle)."""
    arch = ResNetArch.from_json(manifest.get("arch") or {})
    file = Path(path) / WEIGHTS
    weights = read_weights(file)
    net = ResNetNet(arch)
    try:
        missing, unexpected = net.load_state_dict(weights, strict=False)
    except RuntimeError as exc:     # a tensor of the wrong shape
        raise CheckpointError(f"{file}: does not match the manifest's arch ({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise CheckpointError(f"{file}: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    return ResNetEE(net, manifest.get("name", "resnet"), manifest.get("labels"))
