"""Exit estimators' mechanics on a tiny random Gemma 3 (the real ones train on real text)."""
from __future__ import annotations

import torch

from e3.models.causal_lm import estimators as est_mod
from e3.models.causal_lm.model import EarlyExitCausalLM

from .llm_support import prompts, tiny_gemma3


def test_trace_is_the_library_forward():
    lm = tiny_gemma3()
    model = EarlyExitCausalLM(lm, (2,))
    ids = prompts(3)[2]
    h = model.trace(ids, (2,))
    torch.testing.assert_close(model.family.logits(h[4]), lm(torch.tensor([ids])).logits[0], rtol=1e-4, atol=1e-5)
    assert set(h) == {2, 4} and h[2].shape == (len(ids), 32)


def test_collect_labels_agreement_with_full_depth():
    lm = tiny_gemma3()
    model = EarlyExitCausalLM(lm, (1, 3))
    texts = prompts(6)
    (d1, d3) = est_mod.collect(model, texts, chunk=7)
    n = sum(len(t) - 1 for t in texts)
    assert d1.features.shape == (n, 32) and d1.agree.shape == (n,)
    full = torch.cat([lm(torch.tensor([t])).logits[0, 1:].argmax(-1) for t in texts])
    exit3 = torch.cat([model.family.logits(model.trace(t, (3,))[3][1:]).argmax(-1) for t in texts])
    torch.testing.assert_close(d3.agree, (exit3 == full).float())


def test_calibrated_thresholds_meet_the_target_on_their_data():
    lm = tiny_gemma3()
    model = EarlyExitCausalLM(lm, (1, 3))
    data = est_mod.collect(model, prompts(12))
    est = est_mod.ExitEstimators(32, 2, width=8)
    est_mod.train(est, data, steps=50)
    target = 0.5
    report = est_mod.calibrate(est, data, target, min_count=3)
    for e, (d, r) in enumerate(zip(data, report)):
        leave = est.rule(e, d.features)
        if r["threshold"] == est_mod.OFF:
            assert not leave.any()
        else:
            assert float(d.agree[leave].mean()) >= target
            assert abs(float(leave.float().mean()) - r["share_leaving"]) < 1e-6


def scripted_estimators(n_exits: int) -> est_mod.ExitEstimators:
    """Estimators whose probability is a row's first feature (a test fake for a trained head)."""
    est = est_mod.ExitEstimators(2, n_exits, width=1)
    est.forward = lambda e, x: x[:, 0]
    return est


def test_calibration_finds_a_small_confident_region_below_one_half():
    """100 rows with probabilities 0.01..0.40: the 30 most confident agree but for 2, the rest do
    not. The threshold lands inside that region (below 0.5), and what leaves meets the target."""
    p = torch.linspace(0.01, 0.40, 100)
    agree = (p > 0.40 - 30 * 0.39 / 99).float()
    agree[[-3, -7]] = 0.0
    d = est_mod.ExitData(torch.stack([p, p], 1), agree)
    est = scripted_estimators(2)
    report = est_mod.calibrate(est, [d, d], [0.9, 0.99], min_count=20)
    leave = est.rule(0, d.features)
    assert 20 <= int(leave.sum()) <= 31 and float(d.agree[leave].mean()) >= 0.9
    assert report[0]["threshold"] < 0.5 and abs(report[0]["share_leaving"] - float(leave.float().mean())) < 1e-6
    # a per-exit target of 0.99 is out of reach with 20 rows or more: that exit is off, its best stated
    assert report[1]["threshold"] == est_mod.OFF and not est.rule(1, d.features).any()
    assert 0.9 <= report[1]["best_agreement"] < 0.99 and report[1]["best_share"] >= 0.2


def test_decode_samples_are_the_positions_of_the_models_own_greedy_tokens():
    from e3.models.causal_lm.gemma3_270m import continuations, decode_samples
    from .llm_support import library_greedy
    lm = tiny_gemma3()
    model = EarlyExitCausalLM(lm, (1, 3))
    ps = prompts(5)
    conts = continuations(model, ps, 6, batch=2)
    assert conts == [library_greedy(lm, p, 6)[:6] for p in ps] and all(len(c) == 6 for c in conts)
    d1, d3 = decode_samples(model, ps, 6)
    assert d1.features.shape == (5 * 5, 32)           # 5 decode steps a prompt (the first token is prefill's)
    exit3 = torch.cat([model.family.logits(model.trace(p + c[:-1], (3,))[3][len(p):]).argmax(-1)
                       for p, c in zip(ps, conts)])
    torch.testing.assert_close(d3.agree, (exit3 == torch.tensor([t for c in conts for t in c[1:]])).float())
