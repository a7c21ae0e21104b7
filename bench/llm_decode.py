"""Decode speed of early-exit Gemma 3 270M on this machine: exits off vs on, batch 1 and 8.

    nice -n 10 python3 -m bench.llm_decode --out bench/results/llm_cpu.json

Prompts: the first half (by words, at least 3) of the held-out fortunes texts
that the exit estimators never trained on (models/causal_lm/gemma3_270m.py).
Every prompt is prefilled at full depth, then `--tokens` tokens are decoded
greedily (no stop token, so every row of a batch decodes the same number of
steps); decode tokens/s counts decode steps only. Agreement compares each
prompt's tokens with full-depth greedy decoding of the same prompt. The
profile (one full-depth step, and the LM head alone, at each batch) gives the
cap on any early exit: a token that left at layer 0 still pays the head.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from e3.models.causal_lm import gemma3_270m
from e3.models.causal_lm.model import EarlyExitCausalLM, SequenceKV


def prompts(tok, n: int) -> list[list[int]]:
    held, _ = gemma3_270m.split_texts(gemma3_270m.fortune_texts())
    out = []
    for text in held:
        words = text.split()
        if len(words) >= 6:
            out.append(tok(" ".join(words[: len(words) // 2]))["input_ids"])
        if len(out) == n:
            break
    return out


def decode_batch(model: EarlyExitCausalLM, batch: list[list[int]], n: int, use_exits: bool):
    """(tokens per row, exit layers of decode tokens per row, decode seconds)."""
    pool = model.new_pool(len(batch), max(map(len, batch)) + n)
    seqs = [SequenceKV(pool.acquire()) for _ in batch]
    nxt = [int(model.prefill(pool, s, p).argmax()) for s, p in zip(seqs, batch)]
    toks, layers = [[t] for t in nxt], [[] for _ in batch]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        out = model.decode(pool, seqs, nxt, use_exits=use_exits)
        nxt = out.logits.argmax(-1).tolist()
        for r, t in enumerate(nxt):
            toks[r].append(t)
            layers[r].append(out.exit_layers[r])
    return toks, layers, time.perf_counter() - t0


def run(model, ps, n, batch, use_exits):
    toks, layers, secs = [], [], 0.0
    for i in range(0, len(ps), batch):
        t, l, s = decode_batch(model, ps[i:i + batch], n, use_exits)
        toks += t
        layers += l
        secs += s
    decode_tokens = sum(len(l) for l in layers)
    return {"tokens": toks, "layers": layers, "decode_s": round(secs, 2),
            "decode_tok_s": round(decode_tokens / secs, 2), "decode_tokens": decode_tokens}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = [sum(x == y for x, y in zip(p, q)) / len(p) for p, q in zip(a, b)]
    prefix = []
    for p, q in zip(a, b):
        k = next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
        prefix.append(k / len(p))
    return {"identical_sequences": sum(p == q for p, q in zip(a, b)), "of": len(a),
            "positionwise": round(sum(same) / len(same), 3),
            "agreeing_prefix": round(sum(prefix) / len(prefix), 3)}


@torch.inference_mode()
def profile(model: EarlyExitCausalLM, batch: int, reps: int = 5) -> dict:
    """Seconds of one full-depth decode step and of the final norm + LM head alone, at `batch`."""
    pool = model.new_pool(batch, 64)
    seqs = [SequenceKV(pool.acquire(), length=16) for _ in range(batch)]
    h = torch.randn(batch, model.family.hidden_size)
    def timed(f):
        f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t0) / reps
    step = timed(lambda: model.decode(pool, [SequenceKV(s.slot, 16) for s in seqs], [5] * batch, use_exits=False))
    head = timed(lambda: model.family.logits(h))
    return {"batch": batch, "step_s": round(step, 4), "head_s": round(head, 4),
            "cap_speedup": round(step / head, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--kv-mode", default="copy", choices=["copy", "exact"])
    p.add_argument("--out", default="bench/results/llm_cpu.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tok, model = gemma3_270m.load(args.kv_mode)
    load_s = time.perf_counter() - t0
    ps = prompts(tok, args.prompts)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"Python {platform.python_version()}, torch {torch.__version__}",
              "kv_mode": args.kv_mode, "prompts": len(ps), "tokens": args.tokens, "load_s": round(load_s, 1),
              "estimators": json.loads((gemma3_270m.estimators_dir() / "e3-model.json").read_text()),
              "runs": {}, "profile": []}
    for b in map(int, args.batches.split(",")):
        full = run(model, ps, args.tokens, b, use_exits=False)
        ee = run(model, ps, args.tokens, b, use_exits=True)
        hist = Counter(l for row in ee["layers"] for l in row)
        result["runs"][str(b)] = {
            "full_tok_s": full["decode_tok_s"], "exits_tok_s": ee["decode_tok_s"],
            "speedup": round(ee["decode_tok_s"] / full["decode_tok_s"], 3),
            "exit_layers": {str(k): hist[k] for k in sorted(hist)},
            "mean_layers": round(sum(k * v for k, v in hist.items()) / sum(hist.values()), 2),
            "agreement": agreement(ee["tokens"], full["tokens"]),
            "example": {"prompt": tok.decode(ps[0], skip_special_tokens=True),
                        "full": tok.decode(full["tokens"][0]), "exits": tok.decode(ee["tokens"][0]),
                        "exit_layers": ee["layers"][0]}}
        result["profile"].append(profile(model, b))
        print(json.dumps(result["runs"][str(b)], indent=1), flush=True)
    result["command"] = "nice -n 10 python3 -m bench.llm_decode " + " ".join(argv or sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result["profile"]))
    return 0


def markdown(r: dict) -> str:
    """The run as a markdown report (every figure from `r`)."""
    lines = [f"# Early-exit decoding of Gemma 3 270M on CPU ({r['kv_mode']} KV mode)", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             f"{r['prompts']} prompts (held-out fortunes halves), {r['tokens']} greedy tokens each; "
             "decode steps only are timed.", "",
             "| batch | full depth tok/s | exits tok/s | speedup | mean layers | identical seqs | "
             "positionwise agreement | agreeing prefix |", "|---|---|---|---|---|---|---|---|"]
    for b, run in r["runs"].items():
        a = run["agreement"]
        lines.append(f"| {b} | {run['full_tok_s']} | {run['exits_tok_s']} | {run['speedup']} | "
                     f"{run['mean_layers']} of 18 | {a['identical_sequences']}/{a['of']} | "
                     f"{a['positionwise']} | {a['agreeing_prefix']} |")
    lines += ["", "Exit layers of decode tokens (18: full depth):", ""]
    for b, run in r["runs"].items():
        lines.append(f"- batch {b}: {run['exit_layers']}")
    lines += ["", "Profile (one full-depth decode step; the final norm + LM head alone; the cap on "
              "any early exit's speedup = step / head):", "",
              "| batch | step s | head s | cap |", "|---|---|---|---|"]
    lines += [f"| {p['batch']} | {p['step_s']} | {p['head_s']} | {p['cap_speedup']}x |" for p in r["profile"]]
    est = r["estimators"]
    lines += ["", f"Exit estimators (exits after layers {est['exits']}, target agreement "
              f"{est['target_agreement']}, built in "
              f"{est['build_seconds']} s):", "", "| exit | threshold | share leaving | agreement of leaving "
              "| base agreement |", "|---|---|---|---|---|"]
    for layer, h in zip(est["exits"], est.get("calibration", est["held_out"])):   # v2 sets thresholds on calibration
        lines.append(f"| {layer} | {h['threshold']:.3g} | {h['share_leaving']:.3f} | "
                     f"{h['agreement_of_leaving']} | {h['base_agreement']:.3f} |")
    ex = next(iter(r["runs"].values()))["example"]
    lines += ["", f"Example: prompt {ex['prompt']!r}", f"- full depth: {ex['full']!r}",
              f"- exits: {ex['exits']!r}", f"- exit layers: {ex['exit_layers']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
