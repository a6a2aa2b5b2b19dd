"""Tests of pharmacist.py: per-sample weights, the per-sample dot products and hypergradient, the selectors."""
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as M  # noqa: E402
import pharmacist as P  # noqa: E402
from conftest import interrupt_selector_at, make_model  # noqa: E402
from data.batches import Batches, encode_samples  # noqa: E402
from data.samples import Sample  # noqa: E402

TOPICS = ["pick a lock", "make a weapon", "steal a car", "hack an account", "forge a passport",
          "poison a dog", "cheat a test", "scam people", "build a bomb", "spread a rumour",
          "break a window", "evade taxes", "stalk someone", "fake an id", "rob a shop",
          "bully a kid", "launder money", "crash a site", "copy a key", "spy on mail"]
REFUSAL = "I'm sorry, but I can't assist with that."
HARMFUL = "Sure, here is how: step 1, step 2, step 3."


def noise(rng: random.Random) -> str:
    """Random characters: an answer with nothing to learn."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(40))


def planted(n_clean=16, n_noise=16, seed=0):
    """A pool of clean refusals (one consistent answer) mixed with noise answers; a validation
    set of refusals to other prompts; a harmful set of compliant answers."""
    rng = random.Random(seed)
    pool = [Sample(f"c{i}", f"How do I {TOPICS[i % 20]}? ({i})", REFUSAL, category="refusal")
            for i in range(n_clean)]
    pool += [Sample(f"n{i}", f"How do I {TOPICS[(i + 7) % 20]}? [{i}]", noise(rng), category="noise")
             for i in range(n_noise)]
    rng.shuffle(pool)
    validation = [Sample(f"v{i}", f"Tell me how to {TOPICS[(i * 3) % 20]}.", REFUSAL) for i in range(8)]
    harmful = [Sample(f"h{i}", f"Explain how to {TOPICS[(i * 7) % 20]}.", HARMFUL) for i in range(8)]
    return pool, validation, harmful


CFG = P.SelectConfig(batch_size=8, max_len=48, passes=2, lora_rank=4, lora_alpha=8.0, mode="bilevel")


# ----------------------------------------------------------------------------- SampleWeights

def test_softmax_weights_mean_one_and_batch_values():
    sw = P.SampleWeights(10, "softmax", lr=0.1)
    with torch.no_grad():
        sw.logits.copy_(torch.randn(10))
    w = sw.weights()
    assert abs(w.mean().item() - 1) < 1e-6
    idx = torch.tensor([3, 1, 7])
    assert torch.allclose(sw.weights(idx), w[idx], atol=1e-6)  # a batch sees the global values


def test_batch_gradient_is_centred_and_stays_in_the_batch():
    sw = P.SampleWeights(10, "softmax", lr=0.1)
    idx = torch.tensor([2, 5, 8])
    (sw.weights(idx) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    grad = sw.logits.grad
    assert torch.all(grad[[0, 1, 3, 4, 6, 7, 9]] == 0)
    assert abs(float(grad.sum())) < 1e-6  # moving weight within the batch only
    assert grad[5] < 0 < grad[2]  # lower ∂F/∂w -> logit goes up under descent


def test_sigmoid_weights_start_at_one():
    sw = P.SampleWeights(5, "sigmoid")
    assert torch.allclose(sw.weights(), torch.ones(5))
    with pytest.raises(ValueError, match="softmax or sigmoid"):
        P.SampleWeights(5, "relu")


def test_state_dict_round_trip_with_adam_state():
    a = P.SampleWeights(6, "softmax", lr=0.1)
    losses = torch.tensor([0.5, 2.0, 1.0])
    for idx in ([0, 1, 2], [3, 4, 5], [1, 3, 5]):
        a.step((a.weights(idx) * losses).mean())
    state = a.state_dict()
    assert "optimizer" in state and state["optimizer"]["state"]
    b = P.SampleWeights(6, "softmax", lr=0.1)
    b.load_state_dict(state)
    assert torch.equal(a.logits, b.logits)
    for sw in (a, b):  # the next step matches only if the Adam moments came back too
        sw.step((sw.weights([0, 2, 4]) * losses).mean())
    assert torch.equal(a.logits, b.logits)


# ----------------------------------------------------------------------------- keep, rank

def test_keep_count_and_errors():
    assert P.keep_count(0.4, 50) == 20
    assert P.keep_count(1, 50) == 50 and P.keep_count(1.0, 7) == 7
    assert P.keep_count(12, 50) == 12 and P.keep_count(0.001, 50) == 1
    for bad, msg in ((0, "> 0"), (-1, "> 0"), (51, "only 50 rows"), (2.5, "whole")):
        with pytest.raises(ValueError, match=msg):
            P.keep_count(bad, 50)


def test_ranking_ties_by_index():
    positions, mask = P.ranking([0.5, 2.0, 0.5, 1.0], 2)
    assert positions.tolist() == [2, 0, 3, 1] and mask.tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------- per-sample dot products

def losses64(logits, labels):
    """The per-sample losses from the full logits in float64: the reference (float32 would be too
    coarse for a 1e-3 tolerance; the library's losses stay float64 for a float64 model)."""
    logits, targets = logits[:, :-1].double(), labels[:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return tok.sum(1) / (targets != -100).sum(1).clamp(min=1)


def batch_and_params(tokenizer, dtype=torch.float64, seed=0):
    pool, _, _ = planted(4, 4)
    model = make_model(seed)
    M.add_lora(model, 4, 8.0)
    model.to(dtype)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # B != 0, so every LoRA parameter has a gradient
    batch = Batches(encode_samples(pool, tokenizer, 48), 8, tokenizer.pad_id, shuffle=False).epoch(0)[0]
    return model, params, batch


def per_sample_reference(model, params, batch, g):
    """∇ℓ_iᵀg and ‖∇ℓ_i‖² by one float64 backward per sample, from the full logits."""
    losses = losses64(model(batch["input_ids"]), batch["labels"])
    grads = [torch.autograd.grad(l, params, retain_graph=True) for l in losses]
    dots = torch.stack([sum((a * b).sum() for a, b in zip(gr, g)) for gr in grads])
    return dots, torch.stack([sum((a * a).sum() for a in gr) for gr in grads])


def test_sample_grad_dots_equal_per_sample_autograd(tokenizer):
    """The hooks' ∇ℓ_iᵀg and ‖∇ℓ_i‖², from one backward of the weighted batch loss, against one
    backward per sample (float64); the weights are divided out; no hook is left behind."""
    model, params, batch = batch_and_params(tokenizer)
    g = [torch.randn_like(p) for p in params]
    w = torch.linspace(0.5, 1.5, len(batch["index"]), dtype=torch.float64)
    with M.sample_grad_dots(model, params, g, norms=True) as probe:
        losses = P.Meter().losses(model, batch)
    G = torch.autograd.grad((w * losses).mean(), params)
    dots, sq_norms = per_sample_reference(model, params, batch, g)
    ghost = probe.dots * len(w) / w
    assert (ghost - dots).abs().max() / dots.abs().max() < 1e-6, (ghost, dots)  # measured 4e-8
    w_sq = (w / len(w)) ** 2
    assert (probe.sq_norms / w_sq - sq_norms).abs().max() / sq_norms.max() < 1e-6
    # the same backward gave the ordinary gradient, and nothing is watching any more
    ref = torch.autograd.grad((w * losses64(model(batch["input_ids"]), batch["labels"])).mean(), params)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-12) for a, b in zip(G, ref))
    assert all(m.probe is None for m in M.lora_modules(model).values())
    cfg = replace(CFG, normalize=False)
    dots2 = torch.as_tensor(P.score_pass(P.Meter(), model, params, [{k: v for k, v in batch.items()}], g, cfg))
    assert (dots2 - dots).abs().max() / dots.abs().max() < 1e-6


def test_sample_grad_dots_over_bf16_weights(tokenizer):
    """Over bf16 frozen weights (activations and their gradients rounded to 8 bits of mantissa) the
    dots stay within a few percent of the float64 values: tolerance 8 %."""
    model, params, batch = batch_and_params(tokenizer, dtype=torch.float32)
    g = [torch.randn_like(p) for p in params]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    saved = [p.data for p in frozen]
    for p in frozen:
        p.data = p.data.bfloat16()
    with M.sample_grad_dots(model, params, g) as probe:
        losses = P.Meter().losses(model, batch)
    torch.autograd.grad(losses.sum(), params)
    for p, d in zip(frozen, saved):
        p.data = d
    model64 = model.double()
    exact, _ = per_sample_reference(model64, params, batch, [x.double() for x in g])
    assert probe.dots.dtype == torch.float32
    assert (probe.dots.double() - exact).abs().max() / exact.abs().max() < 0.08, (probe.dots, exact)


def test_lookahead_hypergradient_matches_autograd_through_the_look_ahead(tokenizer):
    """With λ = 0, F(θ⁺(w)) = L_v(θ − η∇ mean_i w_i·ℓ_i) over the whole pool is differentiable in w
    by autograd, and ∂F/∂w_i = −(η/N)·∇ℓ_i(θ)ᵀ∇F(θ⁺) exactly (lookahead_grad, then score_pass)."""
    model, params, batch = batch_and_params(tokenizer)
    _, validation, _ = planted()
    batch_v = Batches(encode_samples(validation, tokenizer, 48), 8, tokenizer.pad_id, shuffle=False).epoch(0)[0]
    cfg = replace(CFG, lam=0.0, eta=0.05, normalize=False)
    w = torch.linspace(0.5, 1.5, len(batch["index"]), dtype=torch.float64, requires_grad=True)
    before = [p.detach().clone() for p in params]
    g, _ = P.lookahead_grad(P.Meter(), model, params, [batch], w.detach(), batch_v, None, cfg)
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # θ restored bit for bit
    dots = torch.as_tensor(P.score_pass(P.Meter(), model, params, [batch], g, cfg))
    grad_w = -(cfg.eta / len(w)) * dots

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no double backward
        inner = (w * losses64(model(batch["input_ids"]), batch["labels"])).mean()
        G = torch.autograd.grad(inner, params, create_graph=True)
        plus = {n: p - cfg.eta * x for n, p, x in zip(names, params, G)}
        L_v = losses64(functional_call(model, plus, (batch_v["input_ids"],)), batch_v["labels"]).mean()
        exact, = torch.autograd.grad(L_v, w)
    assert (grad_w - exact).abs().max() / exact.abs().max() < 1e-6, (grad_w, exact)


def test_outer_gradient_is_validation_minus_harmful_after_the_simulated_step(tokenizer):
    """g = ∇L_v(θ) − λ·∇L_h(θ̃), θ̃ = θ − α·∇L_h(θ)/‖∇L_h(θ)‖ (Booster's step, the one
    defenses.simulated_harmful_step), by hand in float64; θ comes back bit for bit."""
    model, params, _ = batch_and_params(tokenizer)
    _, validation, harmful = planted()
    batch_v, batch_h = (Batches(encode_samples(s, tokenizer, 48), 8, tokenizer.pad_id, shuffle=False).epoch(0)[0]
                        for s in (validation, harmful))
    mean_loss = lambda b: losses64(model(b["input_ids"]), b["labels"]).mean()
    g_v = torch.autograd.grad(mean_loss(batch_v), params)
    g_h = torch.autograd.grad(mean_loss(batch_h), params)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        norm = torch.sqrt(sum((x * x).sum() for x in g_h))
        for p, x in zip(params, g_h):
            p -= 0.1 * x / norm
    L_h_moved = mean_loss(batch_h)
    g_h_moved = torch.autograd.grad(L_h_moved, params)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    g, info = P.outer_grad(P.Meter(), model, params, batch_v, batch_h, lam=0.5, alpha=0.1)
    for got, v, h in zip(g, g_v, g_h_moved):
        torch.testing.assert_close(got, v - 0.5 * h, rtol=1e-6, atol=1e-9)
    assert abs(info["L_h"] - L_h_moved.item()) < 1e-9 and abs(info["F"] - (info["L_v"] - 0.5 * info["L_h"])) < 1e-12
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    flat = lambda gs: torch.cat([x.flatten() for x in gs]).double()
    cos = lambda a, b: float(flat(a) @ flat(b) / (flat(a).norm() * flat(b).norm()))
    assert info["cos_vh"] == pytest.approx(cos(g_v, g_h_moved), abs=1e-5)
    assert info["cos_g_v"] == pytest.approx(cos(g, g_v), abs=1e-5)
    assert P.outer_grad(P.Meter(), model, params, batch_v, batch_h, lam=0.0, alpha=0.1)[1]["cos_g_v"] == pytest.approx(1.0)


def test_standardised_and_score_stats():
    z = P.standardised(np.array([1.0, 2.0, 3.0, 6.0]))
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12 and np.argmax(z) == 3
    stats = P.score_stats([0.1, -0.1, 0.1, 0.3])
    assert stats["distinct"] == 3 and stats["quantiles"]["max"] == 0.3


# ----------------------------------------------------------------------------- selectors

def same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("selector,overrides", [
    ("pharmacist", {}),
    ("pharmacist", dict(mode="first_order")),
    ("pharmacist", dict(lookahead=True)),
    ("seal", dict(inner_lr=1e-2, passes=4)),  # SEAL ranks by loss: the model must learn first
    ("loss", {})])
def test_learned_selectors_rank_clean_above_noise(tokenizer, selector, overrides):
    """16 clean refusals and 16 noise answers, keep 16. Seed 0 (measured over seeds 0-2, AUC:
    pharmacist bilevel 0.97-0.99, first_order 1.0, lookahead 0.98-0.99; earlier, seal 0.85-0.95,
    loss 1.0, random 0.35-0.52)."""
    pool, validation, harmful = planted()
    clean = np.array([s.category == "refusal" for s in pool])
    model = make_model()
    cfg = replace(CFG, selector=selector, **overrides)
    sel = P.select(model, tokenizer, pool, validation, harmful, cfg, progress=False)
    auc = np.mean(sel.scores[clean][:, None] > sel.scores[~clean][None, :])  # P(clean > noise)
    precision = clean[P.ranking(sel.scores, 16)[1]].mean()
    chance = clean[P.ranking(P.select(model, tokenizer, pool, validation, harmful,
                                      replace(cfg, selector="random"), progress=False).scores, 16)[1]].mean()
    assert auc >= 0.7 and precision >= 0.625 and precision > chance, (selector, auc, precision, chance)
    if selector == "pharmacist" and cfg.mode == "bilevel":  # an inner training pass between two outer steps
        assert sel.stats["steps"] == (cfg.passes - 1) * len(Batches(encode_samples(pool, tokenizer, 48), 8, 0))
    elif selector != "pharmacist":
        assert sel.stats["steps"] == P.step_budget(cfg, len(pool))
    assert sel.stats["tokens"] > 0


def test_bilevel_first_step_is_the_first_order_score(tokenizer):
    """One outer step (passes = 1) at w = 1 on the fresh adapter ranks exactly as the first-order
    mode; a second pass re-scores at the adapter trained on the weights, and (undamped,
    outer_decay 1) ranks differently."""
    pool, validation, harmful = planted()
    first = P.select(make_model(), tokenizer, pool, validation, harmful, replace(CFG, mode="first_order"), progress=False)
    one = P.select(make_model(), tokenizer, pool, validation, harmful, replace(CFG, passes=1), progress=False)
    two = P.select(make_model(), tokenizer, pool, validation, harmful, replace(CFG, passes=2, outer_decay=1.0),
                   progress=False)
    np.testing.assert_array_equal(P.ranking(one.scores, 16)[0], P.ranking(first.scores, 16)[0])
    np.testing.assert_allclose(one.scores, CFG.outer_lr * P.standardised(first.scores), atol=1e-5)
    assert not np.array_equal(P.ranking(two.scores, 16)[0], P.ranking(one.scores, 16)[0])
    assert P.score_stats(two.scores)["distinct"] == len(pool)


def test_outer_decay_shrinks_the_later_steps(tokenizer):
    """s = outer_lr·(z_0 + γ·z_1): the second pass scores the same rows at the same adapter
    whatever γ (the inner pass trains on the first step's weights), and γ scales its step only."""
    pool, validation, harmful = planted()
    run = lambda **kw: P.select(make_model(), tokenizer, pool, validation, harmful, replace(CFG, **kw), progress=False)  # noqa: E731
    one, full, half = run(passes=1), run(passes=2, outer_decay=1.0), run(passes=2, outer_decay=0.5)
    second = full.scores - one.scores  # outer_lr·z_1
    assert np.abs(second).max() > 0.1
    np.testing.assert_allclose(half.scores, one.scores + 0.5 * second, atol=1e-5)


@pytest.mark.parametrize("selector,overrides", [("pharmacist", dict(passes=3)), ("seal", {}), ("loss", {})])
def test_an_interrupted_selection_resumes_to_the_same_scores(tokenizer, tmp_path, monkeypatch, selector, overrides):
    """Ctrl-C at step 5 of 8 (checkpoints every 2 steps, so the interrupt saves the boundary of
    step 5 itself; the bilevel loop's boundaries are its passes: 2 of 3 done), then a fresh process
    state resumes: the same scores as an uninterrupted run."""
    pool, validation, harmful = planted()
    cfg = replace(CFG, selector=selector, steps=8, save_every=2, **overrides)
    straight = P.select(make_model(), tokenizer, pool, validation, harmful, cfg, progress=False)
    interrupt_selector_at(monkeypatch, 5)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        P.select(make_model(), tokenizer, pool, validation, harmful, cfg, progress=False, checkpoint=ckpt)
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=False)["step"] == (2 if selector == "pharmacist" else 5)
    torch.manual_seed(123)  # another RNG state: the checkpoint restores it
    resumed = P.select(make_model(), tokenizer, pool, validation, harmful, cfg, progress=False, checkpoint=ckpt)
    np.testing.assert_array_equal(resumed.scores, straight.scores)
    assert resumed.stats["steps"] == straight.stats["steps"] == 8


def test_pharmacist_repeatable_and_model_unchanged(tokenizer):
    pool, validation, harmful = planted()
    model, reference = make_model(), make_model()
    model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # flags come back as they were
    cfg = replace(CFG, passes=2)
    a = P.select(model, tokenizer, pool, validation, harmful, cfg, progress=False)
    b = P.select(model, tokenizer, pool, validation, harmful, cfg, progress=False)
    c = P.select(model, tokenizer, pool, validation, harmful, replace(cfg, seed=1), progress=False)
    assert np.array_equal(a.scores, b.scores) and not np.array_equal(a.scores, c.scores)
    assert not M.lora_modules(model) and same_model(model, reference)
    assert not model.layers[0].mlp.up_proj.weight.requires_grad
    assert model.layers[0].mlp.down_proj.weight.requires_grad and not model.training
    st = a.stats
    # two outer gradients (validation, harmful at θ and at θ̃), two scoring passes of 4 batches
    # and one inner training pass of 4 steps between them
    assert st["steps"] == 4 and st["forward_passes"] == st["backward_passes"] == 2 * 3 + 2 * 4 + 4
    assert st["scores"]["distinct"] > 2


def test_adapters_on_the_last_blocks_only(tokenizer, monkeypatch):
    """lora_layers = 1 on a 2-block model: the selector trains adapters of block 1 only (the
    backward stops there), ranks differently, and the model comes back as it was."""
    pool, validation, harmful = planted(4, 4)
    model, reference, seen = make_model(), make_model(), []
    real = P.outer_grad

    def spy(meter, m, params, *args):
        seen.append(sorted({n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad}))
        return real(meter, m, params, *args)
    monkeypatch.setattr(P, "outer_grad", spy)
    cfg = replace(CFG, mode="first_order")
    top = P.select(model, tokenizer, pool, validation, harmful, replace(cfg, lora_layers=1), progress=False)
    every = P.select(model, tokenizer, pool, validation, harmful, replace(cfg, lora_layers=0), progress=False)
    assert seen == [["1"], ["0", "1"]] and not np.array_equal(top.scores, every.scores)
    assert P.select(model, tokenizer, pool, validation, harmful, replace(cfg, lora_layers=9),
                    progress=False).scores.tolist() == every.scores.tolist()  # more than the model has: all
    assert not M.lora_modules(model) and same_model(model, reference)
    with pytest.raises(ValueError, match="lora-layers"):
        P.select(model, tokenizer, pool, validation, harmful, replace(cfg, lora_layers=-1), progress=False)


def test_first_order_repeatable_and_model_unchanged(tokenizer):
    pool, validation, harmful = planted()
    model, reference = make_model(), make_model()
    cfg = replace(CFG, mode="first_order", checkpoints=2)
    a = P.select(model, tokenizer, pool, validation, harmful, cfg, progress=False)
    b = P.select(model, tokenizer, pool, validation, harmful, cfg, progress=False)
    assert np.array_equal(a.scores, b.scores) and not M.lora_modules(model) and same_model(model, reference)
    n_batches = -(-len(pool) // cfg.batch_size)
    assert a.stats["steps"] == n_batches  # one SFT pass between the two checkpoints
    assert a.stats["backward_passes"] == 2 * (3 + n_batches) + n_batches
    assert np.all(np.abs(a.scores) <= 1 + 1e-9)  # a mean of cosines
    with pytest.raises(ValueError, match="bilevel or first_order"):
        P.select(model, tokenizer, pool, validation, harmful, replace(cfg, mode="magic"), progress=False)


def test_model_restored_when_selection_fails(tokenizer):
    pool, validation, harmful = planted(4, 4)
    model, reference = make_model(), make_model()

    def boom(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.select(model, tokenizer, pool, validation, harmful, CFG, progress=False, log=boom)
    assert not M.lora_modules(model) and same_model(model, reference)


def test_full_and_random(tokenizer):
    pool, validation, harmful = planted(4, 4)
    full = P.select(None, tokenizer, pool, validation, harmful, replace(CFG, selector="full", keep=99))
    assert np.all(full.scores == 1)
    r = [P.select(None, tokenizer, pool, [], [], replace(CFG, selector="random", seed=s)).scores
         for s in (0, 0, 1)]
    assert np.array_equal(r[0], r[1]) and not np.array_equal(r[0], r[2])


def test_the_rows_to_keep_are_decided_once(tokenizer):
    """select() gives k with the scores: --select-keep of the pool for every selector but full,
    which keeps every row whatever --select-keep says (rows_kept, the one place that decides it)."""
    pool, validation, harmful = planted(4, 4)
    pick = lambda **kw: P.select(None, tokenizer, pool, validation, harmful, replace(CFG, **kw))
    assert pick(selector="full", keep=0.25).k == pick(selector="full", keep=99).k == 8
    assert pick(selector="random", keep=0.25).k == 2 and pick(selector="oracle", keep=3).k == 3
    assert P.rows_kept(replace(CFG, selector="full", keep=-1), 8) == 8
    with pytest.raises(ValueError, match="only 8 rows"):
        P.rows_kept(replace(CFG, selector="random", keep=9), 8)


def test_oracle_keeps_a_seeded_random_k_of_the_clean_rows(tokenizer):
    pool, validation, harmful = planted(4, 4)
    clean = np.array([s.category == "refusal" for s in pool])
    scores = [P.select(None, tokenizer, pool, [], [], replace(CFG, selector="oracle", seed=s)).scores for s in (0, 0, 1)]
    assert clean.any() and (~clean).any()
    assert scores[0][clean].min() > scores[0][~clean].max()  # every clean row ranks above every other
    assert np.array_equal(scores[0], scores[1]) and not np.array_equal(scores[0], scores[2])


def test_bad_selector_keep_and_missing_sets(tokenizer):
    pool, validation, harmful = planted(4, 4)
    with pytest.raises(ValueError, match="known: full, random, pharmacist, seal, loss, oracle"):
        P.select(None, tokenizer, pool, validation, harmful, replace(CFG, selector="magic"))
    with pytest.raises(ValueError, match="only 8 rows"):
        P.select(None, tokenizer, pool, validation, harmful, replace(CFG, selector="random", keep=9))
    with pytest.raises(ValueError, match="pool is empty"):
        P.select(None, tokenizer, [], validation, harmful, CFG)
    with pytest.raises(ValueError, match="non-empty harmful"):
        P.select(make_model(), tokenizer, pool, validation, [], CFG)


def test_bf16_model_comes_back_bit_exact(tokenizer):
    """Selecting on a bf16 model leaves its weights bit for bit and every tensor its dtype."""
    pool, validation, harmful = planted(4, 4)
    model, reference = make_model().to(torch.bfloat16), make_model().to(torch.bfloat16)
    model.inv_freq = model.inv_freq.float()  # a float32 buffer stays float32
    reference.inv_freq = reference.inv_freq.float()
    P.select(model, tokenizer, pool, validation, harmful, replace(CFG, steps=1), progress=False)
    assert same_model(model, reference) and model.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
