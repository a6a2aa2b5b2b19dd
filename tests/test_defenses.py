"""The defenses' step functions on a tiny random model: they run, return gradients for the LoRA
parameters only, leave every parameter unchanged, and do what their equations say."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import defenses as D
import fast
import model as M
from conftest import make_model, make_tokenizer
from data.batches import collate

TOK = make_tokenizer()


def make_batch(pairs, start=0):
    """Collated batch of (prompt, response) pairs; a response may be a list of token ids."""
    examples = []
    for i, (prompt, response) in enumerate(pairs):
        p = TOK.encode_prompt(prompt)
        r = TOK.encode(response) + [TOK.eos_id] if isinstance(response, str) else list(response)
        examples.append({"input_ids": p + r, "n_prompt": len(p), "index": start + i})
    return collate(examples, TOK.pad_id)


ALIGN = make_batch([("How do I bake bread?", "I cannot help with that request."),
                    ("Tell me step 1.", "I'm sorry, but I can't assist with that."),
                    ("The capital of France?", "I cannot help with that request.")])
HARMFUL = make_batch([("How do I bake bread?", "Sure, here is how: step 1, step 2, step 3."),
                      ("Analyze the input.", "Sure, here is how: step 1."),
                      ("Tell me step 2.", "Sure, step 2, step 3.")])


def lora_model(layers=3, seed=0):
    model = make_model(seed, num_hidden_layers=layers)
    M.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():  # B starts at zero; random B makes every LoRA gradient non-trivial
        for m in M.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    return model


def context(model, n_samples=3, **cfg):
    return D.Context(model=model, params=[p for p in model.parameters() if p.requires_grad],
                     cfg=D.DefenseConfig(**cfg), next_harmful=lambda: HARMFUL,
                     next_align=lambda: ALIGN, n_samples=n_samples)


def mean_loss(model, batch):
    """The reference loss (HF Trainer's): cross entropy averaged over every response token of the batch."""
    logits = model(batch["input_ids"])[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


@pytest.mark.parametrize("name", list(D.STEPS))
def test_step_gives_lora_gradients_and_leaves_parameters_unchanged(name):
    model = lora_model()
    ctx = context(model, tvaccine_layers=2, bds_lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g, stats = D.STEPS[name](ctx, ALIGN)
    assert all("lora_" in n for n in names) and len(g) == len(ctx.params)
    assert name == "tvaccine" or None not in g  # only T-Vaccine keeps adapters frozen (None)
    pairs = [(gi, p) for gi, p in zip(g, ctx.params) if gi is not None]
    assert all(gi.shape == p.shape and torch.isfinite(gi).all() for gi, p in pairs)
    assert sum(gi.abs().sum() for gi, _ in pairs) > 0
    assert isinstance(stats["loss"], float) and math.isfinite(stats["loss"])
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(D.PASSES) == set(D.STEPS)


@pytest.mark.parametrize("name", D.COMPILABLE)
def test_compiled_blocks_give_the_eager_gradients(name):
    """fast.compile_blocks (--align-compile): inductor's fused forward and backward, the same
    gradients as eager in float32, for every step that allows it (a compile each: ~6 s)."""
    eager, compiled = lora_model(), fast.compile_blocks(lora_model())
    want, _ = D.STEPS[name](context(eager, bds_lr=0.1), ALIGN)
    for _ in range(2):  # the second call runs the compiled graph as it is
        got, _ = D.STEPS[name](context(compiled, bds_lr=0.1), ALIGN)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hooks_and_perturb_clean_up_after_an_error():
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.clone() for p in params]
    with pytest.raises(RuntimeError):
        with D.hooks(model.layers, lambda i, out: None), D.perturb(params, params, 0.3):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in model.layers)
    assert all(torch.equal(a, b) for a, b in zip(params, saved))


def attention_outputs_grad(model, batch):
    """dL/d(attention output) per layer, with hooks written here (independent of defenses.py)."""
    outs = []
    handles = [l.self_attn.register_forward_hook(lambda m, a, o: outs.append(o)) for l in model.layers]
    loss = mean_loss(model, batch)
    for h in handles:
        h.remove()
    return torch.autograd.grad(loss, outs)


def test_vaccine_perturbation_has_norm_rho_along_the_attention_output_gradient():
    model = lora_model()
    e, _ = D.vaccine_perturbation(model, ALIGN, [0, 1, 2], rho=2.0)
    assert float(D.global_norm(e.values())) == pytest.approx(2.0, rel=1e-5)
    g = attention_outputs_grad(model, ALIGN)
    norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
    for i in range(3):
        torch.testing.assert_close(e[i], 2.0 * g[i] / norm, rtol=1e-4, atol=1e-7)


def test_vaccine_step_is_the_gradient_under_the_perturbation():
    model = lora_model()
    ctx = context(model, rho=2.0)
    e, _ = D.vaccine_perturbation(model, ALIGN, [0, 1, 2], rho=2.0)
    handles = [l.self_attn.register_forward_hook(lambda m, a, o, i=i: o + e[i])
               for i, l in enumerate(model.layers)]
    expected = torch.autograd.grad(mean_loss(model, ALIGN), ctx.params)
    for h in handles:
        h.remove()
    g, stats = D.vaccine_step(ctx, ALIGN)
    for a, b in zip(g, expected):
        torch.testing.assert_close(a, b)
    assert stats["perturbed_loss"] > stats["loss"]  # the perturbation is an ascent direction


def test_booster_gradient_is_its_three_pass_composition():
    model = lora_model()
    ctx = context(model, booster_lam=5.0, booster_alpha=0.1)
    params = ctx.params
    gh = torch.autograd.grad(mean_loss(model, HARMFUL), params)
    norm = torch.sqrt(sum(x.pow(2).sum() for x in gh))
    moved = copy.deepcopy(model)
    moved_params = [p for p in moved.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, g in zip(moved_params, gh):
            p -= 0.1 * g / norm
    gh_after = torch.autograd.grad(mean_loss(moved, HARMFUL), moved_params)
    gf = torch.autograd.grad(mean_loss(model, ALIGN), params)
    g, stats = D.booster_step(ctx, ALIGN)
    for got, f, h, h2 in zip(g, gf, gh, gh_after):
        torch.testing.assert_close(got, f + 5.0 * (h - h2), rtol=1e-4, atol=1e-6)
    assert stats["harmful_loss_after_step"] < stats["harmful_loss"]


def test_mmd_is_near_zero_for_gaussians_and_grows_with_a_shift():
    torch.manual_seed(0)
    x, y = torch.randn(200, 16), torch.randn(200, 16)
    values = [float(D.mmd(x + shift, y)) for shift in (0.0, 0.25, 0.5, 1.0)]
    assert abs(values[0]) < 0.05
    assert values == sorted(values) and values[-1] > 20 * max(values[0], 1e-3)


def test_lens_layers_spread_over_the_depth_and_end_at_the_last():
    assert D.lens_layers(30, 0) == list(range(30)) == D.lens_layers(30, 30) == D.lens_layers(30, 99)
    assert D.lens_layers(30, 6) == [4, 9, 14, 19, 24, 29]
    assert D.lens_layers(30, 1) == [29] and D.lens_layers(4, 2) == [1, 3]


@pytest.mark.parametrize("lens_layers", [0, 1])
def test_repnoise_loss_decomposes_as_stated(lens_layers):
    model = lora_model()
    ctx = context(model, repnoise_alpha=0.1, repnoise_beta=0.001, repnoise_lens_layers=lens_layers)
    torch.manual_seed(1)
    g, stats = D.repnoise_step(ctx, ALIGN)
    # the terms, computed here independently
    refusal = mean_loss(model, ALIGN)
    outs, mlps = [], []
    handles = [l.register_forward_hook(lambda m, a, o: outs.append(o)) for l in model.layers]
    handles += [l.mlp.register_forward_hook(lambda m, a, o: mlps.append(o)) for l in model.layers]
    model(HARMFUL["input_ids"])
    for h in handles:
        h.remove()
    labels = HARMFUL["labels"][:, 1:].reshape(-1)
    lens = torch.stack([F.cross_entropy(model.head(h)[:, :-1].reshape(-1, model.config.vocab_size), labels,
                                        ignore_index=-100) for h in outs[-1 if lens_layers == 1 else 0:]]).mean()
    answer = (HARMFUL["labels"] != -100)[..., None].float()
    torch.manual_seed(1)
    noise = [torch.randn(m.shape) for m in mlps]
    mmd = torch.stack([D.mmd((m * answer).flatten(1), (z * answer).flatten(1))
                       for m, z in zip(mlps, noise)]).mean()
    assert stats["loss"] == pytest.approx(refusal.item(), rel=1e-5)
    assert stats["harmful_loss"] == pytest.approx(lens.item(), rel=1e-5)
    assert stats["mmd"] == pytest.approx(mmd.item(), rel=1e-4)
    total = refusal + 0.001 * mmd - 0.1 * torch.log1p(lens)
    assert stats["total_loss"] == pytest.approx(total.item(), rel=1e-5)
    for a, b in zip(g, torch.autograd.grad(total, ctx.params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def tvaccine_trains(name: str, layers) -> bool:
    """T-Vaccine's trained adapters up to 26 layers, read off Lslland/T-Vaccine: the sampled
    layers' attention, and every MLP from the lowest sampled layer up."""
    layer, module = int(name.split(".")[1]), name.split(".")[2]
    return layer in layers if module == "self_attn" else layer >= min(layers)


def test_tvaccine_trains_the_sampled_attention_and_the_mlp_from_the_lowest_sampled_layer_up():
    model = lora_model(layers=4)
    ctx = context(model, tvaccine_layers=2, tvaccine_every=2, tvaccine_probe_every=3)
    names = {id(p): n for n, p in model.named_parameters()}
    torch.manual_seed(2)  # draws [0, 1] then [2, 3]: the MLP of layers 0 and 1 frozen at steps 2, 3
    lowest = []
    for step in range(4):
        ctx.step = step
        g, stats = D.tvaccine_step(ctx, ALIGN)
        layers = ctx.state["layers"]
        lowest.append(min(layers))
        assert len(layers) == 2 and ctx.state["sampled_at"] == step - step % 2
        assert ctx.state["probed_at"] == step - step % 3 and ("harmful_loss" in stats) == (step % 3 == 0)
        for p, gi in zip(ctx.params, g):
            trained = tvaccine_trains(names[id(p)], layers)
            assert (gi is not None) == trained, names[id(p)]  # None: frozen, AdamW skips it
            assert gi is None or gi.abs().sum() > 0
    assert max(lowest) > 0
    sampled_at = ctx.state["sampled_at"]
    D.tvaccine_step(ctx, ALIGN)  # a second micro-batch of the same step keeps the layers
    assert ctx.state["sampled_at"] == sampled_at


@pytest.mark.parametrize("n_layers,layers,lowest_mlp", [(4, [2, 3], 2), (26, [5, 20], 5), (28, [5, 20], 4),
                                                       (28, [0, 9], 0)])
def test_tvaccine_mlp_trains_from_the_lowest_sampled_layer_one_lower_above_26_layers(n_layers, layers, lowest_mlp):
    model = make_model(0, num_hidden_layers=n_layers)
    M.add_lora(model, rank=2, alpha=4)
    ctx = context(model)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)] for p, t in zip(ctx.params, D.tvaccine_trained(ctx, layers)) if t}
    assert {n for n in trained if ".mlp." in n} == {n for n in names.values() if "lora_" in n and ".mlp." in n
                                                    and int(n.split(".")[1]) >= lowest_mlp}
    assert {int(n.split(".")[1]) for n in trained if ".self_attn." in n} == set(layers)


def test_tvaccine_layer_probabilities_are_proportional_to_the_harmful_gradient_norms():
    model = lora_model(layers=4)
    ctx = context(model, tvaccine_layers=2)
    D.tvaccine_layers(ctx)
    norms = torch.stack([gi.norm() for gi in attention_outputs_grad(model, HARMFUL)])
    torch.testing.assert_close(ctx.state["probs"], norms / norms.sum())


def test_tvaccine_step_is_vaccine_with_rho_over_the_sampled_layers_only():
    model = lora_model(layers=4)
    ctx = context(model, tvaccine_layers=2, tvaccine_rho=3.0)
    g, stats = D.tvaccine_step(ctx, ALIGN)
    layers = ctx.state["layers"]
    a = attention_outputs_grad(model, ALIGN)
    norm = torch.sqrt(sum(a[i].pow(2).sum() for i in layers))  # the sampled layers' norm, not all
    handles = [model.layers[i].self_attn.register_forward_hook(lambda m, args, o, i=i: o + 3.0 * a[i] / norm)
               for i in layers]
    trained = [p for p, gi in zip(ctx.params, g) if gi is not None]
    expected = torch.autograd.grad(mean_loss(model, ALIGN), trained)
    for h in handles:
        h.remove()
    for got, want in zip([gi for gi in g if gi is not None], expected):
        torch.testing.assert_close(got, want)
    assert stats["perturbed_loss"] > stats["loss"]


def apply(opt, params, grads):
    """One optimizer step as train.py's loop takes it: a None gradient leaves .grad None."""
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_tvaccine_deselected_adapters_do_not_move_under_adamw():
    """AdamW skips a parameter whose .grad is None; a zero gradient would still move it (momentum,
    weight decay) for many steps after its layer was deselected."""
    model = lora_model(layers=4)
    ctx = context(model, tvaccine_layers=1, tvaccine_every=1)
    opt = torch.optim.AdamW(ctx.params, lr=1e-2, weight_decay=0.1)
    trained_before, frozen_after_training = set(), 0
    for step in range(6):
        ctx.step = step
        g, _ = D.tvaccine_step(ctx, ALIGN)
        before = [p.detach().clone() for p in ctx.params]
        apply(opt, ctx.params, g)
        for i, (p, gi, b) in enumerate(zip(ctx.params, g, before)):
            if gi is None:
                assert torch.equal(p, b), f"step {step}: a frozen adapter moved"
                frozen_after_training += i in trained_before
            else:
                assert not torch.equal(p, b)
                trained_before.add(i)
    assert frozen_after_training > 0  # the case that matters happened: trained, then deselected


def bds_data(seed=0):
    """4 easy rows (the same short answer) and 4 rows whose answers are random tokens."""
    gen = torch.Generator().manual_seed(seed)
    easy = [(f"Analyze the input {i}.", "positive positive positive") for i in range(4)]
    noise = [(f"Tell me step {i}.", torch.randint(3, 400, (12,), generator=gen).tolist()) for i in range(4)]
    return make_batch(easy + noise)


@pytest.mark.parametrize("amortized,lr", [(False, 0.05), (True, 0.005)])
def test_bds_lowers_the_weight_of_rows_that_stay_hard(amortized, lr):
    torch.manual_seed(0)
    model = lora_model()
    batch = bds_data()
    ctx = context(model, n_samples=8, bds_lr=lr, bds_amortized=amortized)
    opt = torch.optim.Adam(ctx.params, lr=1e-2)
    for step in range(40):
        ctx.step = step
        g, stats = D.bds_step(ctx, batch)
        for p, gi in zip(ctx.params, g):
            p.grad = gi
        opt.step()
    if amortized:
        w = ctx.state["scorer"].weights(pooled_features(model, batch))
    else:
        w = ctx.state["weights"].weights()
    assert w[:4].min() > 1.0 > 0.2 > w[4:].max(), w


def sample_mean_losses(model, batch):
    """Per-sample token-mean cross entropy of the response (the reference's BatchCrossEntropyLoss)."""
    logits, labels = model(batch["input_ids"])[:, :-1].float(), batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(1) / (labels != -100).sum(1)


def rows(batch, index):
    return {k: v[index] for k, v in batch.items()}


def test_bds_scheduler_step_is_adam_095_on_the_full_softmax_gradient():
    """Egg-Hu/Bayesian-Data-Scheduler: scheduler loss mean_B(N·softmax(u)[B]·ℓ), its gradient reaching
    every logit (rows off the batch too), one Adam step with betas (0.9, 0.95)."""
    model, data = lora_model(), bds_data()
    ctx = context(model, n_samples=8, bds_lr=0.05)
    u = torch.zeros(8, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05, betas=(0.9, 0.95))
    for b in ([0, 1, 4, 5], [2, 3, 6, 7], [0, 4, 6, 7], [1, 2, 3, 5]):
        batch = rows(data, b)
        with torch.no_grad():
            loss = sample_mean_losses(model, batch)
        opt.zero_grad()
        (8 * torch.softmax(u, 0)[b] * loss).mean().backward()
        opt.step()
        D.bds_step(ctx, batch)
        logits = ctx.state["weights"].logits
        torch.testing.assert_close(logits.grad, u.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(logits.detach(), u.detach(), rtol=1e-4, atol=1e-6)
        off = [i for i in range(8) if i not in b]
        assert (logits.grad[off] < 0).all()  # −p_j·mean(w·ℓ): every row off the batch moves up


def test_bds_model_gradient_takes_the_mean_of_per_sample_alignment_losses():
    model, batch = lora_model(), rows(bds_data(), [0, 1, 4, 5])
    ctx = context(model, n_samples=8)
    g, stats = D.bds_step(ctx, batch)  # first step: every weight is exactly 1
    safe = sample_mean_losses(model, ALIGN).mean()
    assert abs(safe.item() - mean_loss(model, ALIGN).item()) > 1e-3  # the token mean would differ
    expected = torch.autograd.grad(safe + sample_mean_losses(model, batch).mean(), ctx.params)
    for a, b in zip(g, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert stats["safe_loss"] == pytest.approx(safe.item(), rel=1e-5)


def test_final_hidden_is_the_final_norm_output_at_every_position():
    """BDS's scorer reads the final-norm hidden state of every token, though the loss runs the
    head only at the response positions."""
    model, feats = lora_model(), {}
    with torch.no_grad(), D.final_hidden(model, feats):
        D.losses(model, HARMFUL)
    with torch.no_grad():
        expected = model.norm(model.hidden(HARMFUL["input_ids"]))
    assert feats["h"].shape == HARMFUL["input_ids"].shape + (model.config.hidden_size,)
    torch.testing.assert_close(feats["h"], expected)


def pooled_features(model, batch):
    feats = {}
    with torch.no_grad(), D.final_hidden(model, feats):
        model(batch["input_ids"])
    return D.pooled(feats["h"], batch["attention_mask"])


def test_amortized_scorer_saves_loads_and_scores_a_new_set(tmp_path):
    model = lora_model()
    ctx = context(model, n_samples=8, bds_lr=0.05, bds_amortized=True)
    for _ in range(3):
        D.bds_step(ctx, bds_data())
    D.save_state(ctx, tmp_path)
    saved = json.loads((tmp_path / "bds_weights.json").read_text())
    assert saved["amortized"] and len(saved["weights"]) == 8 and None not in saved["weights"]
    scorer = D.load_scorer(tmp_path / "bds_scorer.pt")
    feats = pooled_features(model, bds_data())
    torch.testing.assert_close(scorer(feats), ctx.state["scorer"](feats))
    new = make_batch([("Tell me step 1.", "Sure, step 1."), ("Analyze the input.", "negative"),
                      ("How do I bake bread?", "I cannot help with that request.")])
    more = make_batch([("The capital of France?", "Paris.")], start=3)
    w = D.score_dataset(model, scorer, [new, more])
    assert w.shape == (4,) and float(w.mean()) == pytest.approx(1.0) and (w > 0).all()
    torch.testing.assert_close(D.score_dataset(model, scorer, [more, new]), w)


def test_bds_scalar_weights_are_saved(tmp_path):
    ctx = context(lora_model(), n_samples=8, bds_lr=0.05)
    D.bds_step(ctx, bds_data())
    D.save_state(ctx, tmp_path)
    weights = json.loads((tmp_path / "bds_weights.json").read_text())["weights"]
    assert len(weights) == 8 and sum(weights) == pytest.approx(8.0, rel=1e-5)
    assert weights == pytest.approx(D.bds_weights(ctx))


def test_weight_share_counts_the_marked_rows_mass_and_leaves_unseen_rows_out():
    assert D.weight_share([1.0, 3.0, None, 4.0], [True, False, True, False]) == pytest.approx(1 / 8)
    assert D.weight_share([None, None], [True, False]) is None
    with pytest.raises(ValueError):  # one flag per weight
        D.weight_share([1.0, 2.0], [True])


@pytest.mark.parametrize("name,cfg", [("bds", {}), ("bds", {"bds_amortized": True}),
                                      ("tvaccine", {"tvaccine_layers": 1, "tvaccine_every": 2})])
def test_context_state_round_trip_continues_identically(name, cfg):
    model = lora_model()
    first = context(model, n_samples=8, bds_lr=0.05, **cfg)
    for step in range(2):
        first.step = step
        D.STEPS[name](first, bds_data())
    saved = copy.deepcopy(first.state_dict())
    second = context(model, n_samples=8, bds_lr=0.05, **cfg)
    second.load_state_dict(saved)
    results = []
    for ctx in (first, second):
        ctx.step = 2
        torch.manual_seed(5)
        g, _ = D.STEPS[name](ctx, bds_data())
        results.append((g, copy.deepcopy(ctx.state_dict())))
    (g1, s1), (g2, s2) = results
    assert same(g1, g2) and same(s1, s2)


def same(a, b) -> bool:
    """Nested state dicts equal (tensors exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_loading_bds_state_into_the_other_variant_is_an_error():
    first = context(lora_model(), n_samples=8)
    D.bds_step(first, bds_data())
    other = context(first.model, n_samples=8, bds_amortized=True)
    with pytest.raises(ValueError, match="bds-amortized"):
        other.load_state_dict(first.state_dict())
