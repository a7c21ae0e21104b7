"""Finding and loading early-exit models.

A model on disk is a directory holding `e3-model.json` (the manifest) and its
weights as safetensors. The manifest's "family" picks the loader:

    {"family": "resnet" | "bert", "name": "...", "labels": [...],
     "policy": {"name": "entropy", "threshold": 0.2}, ...family fields}

Built-in models, trained on first use and cached: "default" (MiniLM-L6 with
ramps trained on short real texts, models/minilm_fortunes.py) and "digits"
(a ResNet-style network on scikit-learn's digits, models/digits.py).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import EarlyExitModel
from .errors import CheckpointError, ModelNotFoundError
from .policies import ExitPolicy, make_policy

MANIFEST = "e3-model.json"
DEFAULT_MODEL = "default"
# built-in name -> (module, function returning its cached directory)
BUILT_IN: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("e3.models.minilm_fortunes", "ensure_model"),
    "minilm-fortunes": ("e3.models.minilm_fortunes", "ensure_model"),
    "digits": ("e3.models.digits", "ensure_default_model"),
}

# family name -> module exposing `load(path: Path, manifest: dict) -> EarlyExitModel`
FAMILIES: dict[str, str] = {
    "resnet": "e3.models.resnet",
    "bert": "e3.models.bert",
}


def cache_dir() -> Path:
    """Where E3 keeps trained default models and profiles ($E3_CACHE or ~/.cache/e3)."""
    return Path(os.environ.get("E3_CACHE") or Path.home() / ".cache" / "e3")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the model directory `path`; clear errors for what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ModelNotFoundError(f"model path {str(root)!r} is not a directory")
    file = root / MANIFEST
    if not file.is_file():
        raise ModelNotFoundError(f"model path {str(root)!r} has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("family") not in FAMILIES:
        raise CheckpointError(
            f"{file}: 'family' must be one of {sorted(FAMILIES)}, got {manifest.get('family')!r}"
            if isinstance(manifest, dict) else f"{file}: expected a JSON object")
    return manifest


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    Path(path, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_weights(file: str | os.PathLike) -> dict:
    """Tensors of a safetensors file (never pickle); CheckpointError names a missing or bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None


@dataclass
class LoadedModel:
    """A model with the exit policy its manifest recommends."""

    model: EarlyExitModel
    policy: ExitPolicy
    path: Path


def resolve(spec: str | os.PathLike) -> Path:
    """The directory of model `spec`: a path, or a built-in name (built and cached on first use)."""
    if str(spec) in BUILT_IN:
        module, func = BUILT_IN[str(spec)]
        return getattr(importlib.import_module(module), func)()
    return Path(spec)


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device: str = "cpu",
               policy: str | None = None, threshold: float | None = None) -> LoadedModel:
    """Load model `spec` (a directory or "default") onto `device`.

    `policy`/`threshold` override the manifest's recommended exit policy.
    """
    path = resolve(spec)
    manifest = read_manifest(path)
    loader: Callable = importlib.import_module(FAMILIES[manifest["family"]]).load
    model = loader(path, manifest).to(device)
    rec = manifest.get("policy") or {"name": "entropy", "threshold": 0.2}
    name = policy or rec.get("name", "entropy")
    if threshold is None:
        threshold = rec.get("threshold", 0.2) if name == rec.get("name") else None
    if threshold is None:
        raise CheckpointError(f"policy {name!r} needs a threshold: the manifest recommends one "
                              f"only for {rec.get('name')!r}")
    return LoadedModel(model, make_policy(name, threshold), path)
