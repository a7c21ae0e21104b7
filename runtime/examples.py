"""Real example inputs of a served model, for the printed query and smoke checks.

A model directory may carry `testset.safetensors` (held-out inputs and labels,
the default model does) or a list of "examples" in its manifest (text models).
"""
from __future__ import annotations

from pathlib import Path

from e3.models.errors import CheckpointError
from e3.models.registry import read_manifest

TESTSET = "testset.safetensors"


def load_examples(model_dir: str | Path, n: int | None = None) -> tuple[list, list[int] | None]:
    """(inputs, labels or None) from the model directory; flat lists for tensors."""
    root = Path(model_dir)
    if (root / TESTSET).is_file():
        from safetensors.torch import load_file
        data = load_file(str(root / TESTSET))
        inputs, labels = data["inputs"][:n], data["labels"][:n]
        return [x.flatten().tolist() for x in inputs], labels.tolist()
    examples = read_manifest(root).get("examples")
    if not examples:
        raise CheckpointError(f"model {str(root)!r} has neither {TESTSET} nor manifest examples")
    texts = [e["text"] if isinstance(e, dict) else e for e in examples][:n]
    labels = [e.get("label") for e in examples][:n] if isinstance(examples[0], dict) else None
    return texts, labels


def example_inputs(runtime, n: int) -> list:
    return load_examples(runtime.model_dir, n)[0]
