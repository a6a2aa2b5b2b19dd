"""Pharmacist: learn which alignment samples to keep, and the baselines it is compared with.

    selection = select(model, tokenizer, pool, validation, harmful, SelectConfig(keep=0.4))
    positions, kept = ranking(selection.scores, selection.k)

THIS IS OUR RECONSTRUCTION of the method described in "Pharmacist: Safety Alignment Data
Curation for LLMs against Harmful Fine-tuning" (arXiv 2510.10085). The paper's code is not
public here; we implement the formulation written down in docs/DESIGN.md ("Pharmacist"):

  pool D_a (N rows), validation set D_v (clean refusals), harmful set D_h (harmful Q&A)
  selector    one logit s_i per pool row,  w = N·softmax(s)                (mean weight 1)
  inner       θ*(s) = argmin_θ  mean_i w_i·ℓ_i(θ)                          (LoRA parameters θ)
  outer       min_s F(θ*(s)),  F(θ) = L_v(θ) − λ·L_h(θ − α·∇L_h(θ)/‖∇L_h(θ)‖)
              stay close to good refusals, and keep the harmful loss high even after a simulated
              harmful fine-tuning step (Booster's first-order simulation).
  hypergradient (learning to reweight, Ren et al. 2018): for a step θ⁺ = θ − η·∇_θ mean_i(w_i·ℓ_i),
              ∂F(θ⁺)/∂w_b = −(η/N)·∇ℓ_b(θ)ᵀ g,          g = ∇F(θ⁺)
  every ∇ℓ_b(θ)ᵀg exact, from one ordinary backward pass over the row's batch: a LoRA gradient is
  a sum over tokens of outer products, so its dot product with g is formed per row from the
  layer's input and output gradient ("ghost" dot products, model.sample_grad_dots); no
  per-sample gradient, no finite difference.
  Our choices where the paper is silent (docs/DESIGN.md):
  - one outer step a pass: every row is scored at the same θ against the same g (score_pass),
    so rows are compared with the whole pool, not with their batch at whatever point of the
    inner training it came; an inner training pass on the current weights lies between two
    steps (inner_pass); `lookahead` takes g at the exact look-ahead point θ⁺.
  - the outer step is exponentiated-gradient (mirror descent on the weight simplex):
    w ← w·exp(outer_lr·z), z the pass's hypergradients standardised over the pool, i.e.
    s ← s + outer_lr·z. (The plain gradient through the softmax multiplies each row's step by its
    weight, so the rows kept highest move most on one noisy pass.) Pass p steps by
    outer_lr·outer_decay^p: the later steps are damped (0.03, chosen on dev pools), since a pass at
    a trained adapter scores what is left to learn rather than what a row is worth.
  - mode `first_order` (the default): the bilevel selector's first step alone, every row scored
    by cos(∇ℓ_b, g) at the fresh adapter with w = 1 (TracIn/LESS-style); `checkpoints` > 1 adds
    passes after SFT on the pool. Measured (docs/RESULTS.md, "Selection"): the scores at an
    adapter trained on the pool rank worse than at the fresh one; damped, the bilevel mode
    ranks as well as its first step at 2.5-2.7x the cost.
  - the selector's adapters sit on the last `lora_layers` blocks only: the backward pass stops
    there, and the gradients of the top blocks separate clean refusals from low-quality answers
    better than those of every block.
  Rows are ranked by their final logit s_b (bilevel) or score (first_order).

Baselines under the same interface (a function returning a `Selection`, one score per row,
higher = keep): `full` (keep everything), `random`, `seal` (SEAL, Shen et al., ICLR 2025: the
penalty-based bilevel selector, its memory-efficient variant) and `loss` (reducible loss,
RHO-LOSS, Mindermann et al., ICML 2022). SEAL's per-sample weights (`SampleWeights`, defenses.py) are BDS's.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

import model as M
from data.batches import Batches, Stream, encode_samples, sample_losses
from defenses import SampleWeights, global_norm, perturb, simulated_harmful_step  # shared with BDS and Booster
import parallel as P
from files import Checkpoint

# ----------------------------------------------------------------------------- config, result


MODES = ("bilevel", "first_order")


@dataclass
class SelectConfig:
    selector: str = "pharmacist"  # full|random|pharmacist|seal|loss|oracle (an ablation: reads the planted kinds)
    keep: float = 0.4  # rows to keep: a fraction in (0, 1] or a count > 1
    passes: int = 2  # passes over the pool (Pharmacist bilevel: outer steps; SEAL, loss: training)
    steps: int = 0  # SEAL and loss: training steps (0: `passes` passes over the pool's batches)
    batch_size: int = 8  # pool rows per step (and validation rows per step for SEAL and loss)
    max_len: int = 128  # tokens per sample (prompt truncated first)
    lora_rank: int = 8  # rank of the selector's own LoRA (all projections)
    lora_alpha: float = 16.0  # LoRA scale alpha
    lora_layers: int = 8  # adapters on the last this many blocks only (0: every block); a shorter backward, and better rankings
    inner_lr: float = 5e-4  # AdamW learning rate of the inner (model) step
    bf16: bool = True  # bf16 frozen weights where the device has bf16 units (fast.train_dtype); fp32 elsewhere
    mode: str = "first_order"  # Pharmacist: first_order (one scoring pass) or bilevel (an outer step a pass)
    outer_batch_size: int = 32  # Pharmacist: validation and harmful rows of each outer gradient
    lookahead: bool = False  # Pharmacist bilevel: g at θ − η·∇ mean_i w_i·ℓ_i (learning to reweight; one pass more)
    eta: float = 1e-3  # Pharmacist lookahead: look-ahead learning rate η
    lam: float = 1.0  # Pharmacist: weight λ of the harmful term of the outer loss
    alpha: float = 0.1  # Pharmacist: size α of the simulated harmful step
    outer_lr: float = 1.0  # Pharmacist bilevel: logit step a pass, in units of the pass's hypergradient spread
    outer_decay: float = 0.03  # Pharmacist bilevel: pass p steps by outer_lr·outer_decay^p (chosen on two dev pools, docs/RESULTS.md)
    selector_lr: float = 0.05  # SEAL: Adam learning rate of the per-sample logits
    weighting: str = "softmax"  # SEAL: softmax (w = N·softmax(s)) or sigmoid (w = 2·sigmoid(s))
    checkpoints: int = 1  # Pharmacist first_order: scoring passes, one SFT pass on the pool between two
    normalize: bool = True  # Pharmacist: cos(∇ℓ_b, g) in place of ∇ℓ_bᵀg (rows of any length count alike)
    gamma: float = 0.9  # SEAL: weight of the validation (safe) loss in the model's loss
    seed: int = 0  # LoRA init, batch order, random scores
    save_every: int = 50  # checkpoint the selector's loop every this many steps (and on Ctrl-C)


@dataclass
class Selection:
    scores: np.ndarray  # one score per pool row, higher = keep
    stats: dict = field(default_factory=dict)  # steps, tokens, passes, ... (for summary.json)
    k: int = 0  # rows to keep: select() sets it (rows_kept)


def keep_count(keep: float, n: int) -> int:
    """Rows to keep: `keep` is a fraction in (0, 1] of the n rows or a whole count in (1, n]."""
    if not keep > 0:
        raise ValueError(f"--select-keep {keep}: must be > 0 (a fraction such as 0.4, or a count such as 64)")
    if keep <= 1:
        return max(1, math.floor(keep * n + 0.5))
    if keep != int(keep):
        raise ValueError(f"--select-keep {keep}: above 1 it is a count of rows and must be whole")
    if keep > n:
        raise ValueError(f"--select-keep {int(keep)}: the pool has only {n} rows; pass a count <= {n} "
                         "or a fraction in (0, 1]")
    return int(keep)


def rows_kept(cfg: SelectConfig, n: int) -> int:
    """k, the rows a selection from n keeps: all n for `full` (whatever --select-keep says), else
    keep_count(cfg.keep, n), which raises for a bad --select-keep."""
    return n if cfg.selector == "full" else keep_count(cfg.keep, n)


def ranking(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(position of each row in the ranking, 0 = best; mask of the k best). Ties go to the earlier row."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # by score descending, then index
    position = np.empty(len(scores), dtype=np.int64)
    position[order] = np.arange(len(scores))
    return position, position < k


# ----------------------------------------------------------------------------- shared machinery


class Meter:
    """What a selector cost: steps, forward and backward passes, tokens through the model."""

    def __init__(self):
        self.steps = self.forward = self.backward = self.tokens = 0
        self.t0 = time.perf_counter()

    def losses(self, model, batch, grad: bool = True) -> torch.Tensor:
        """ℓ_i of every row of the batch (B,), with or without a graph, in the model's own dtype
        (bf16 weights with --select-bf16 where the device has bf16 units: train.load_model)."""
        self.forward += 1
        self.tokens += int(batch["attention_mask"].sum())
        with torch.set_grad_enabled(grad):
            return sample_losses(model.hidden(batch["input_ids"]), batch["labels"], model.head)

    def grad(self, loss, params) -> list[torch.Tensor]:
        self.backward += 1
        return list(torch.autograd.grad(loss, params))

    def stats(self, **extra) -> dict:
        return dict(steps=self.steps, forward_passes=self.forward, backward_passes=self.backward,
                    tokens=self.tokens, selector_seconds=time.perf_counter() - self.t0, **extra)


def stream(samples, tokenizer, cfg: SelectConfig, seed: int, device) -> Stream:
    """Endless shuffled batches of one set, on the model's device."""
    return Stream(encode_samples(samples, tokenizer, cfg.max_len), cfg.batch_size, tokenizer.pad_id, seed, device)


def step_budget(cfg: SelectConfig, n: int) -> int:
    return cfg.steps if cfg.steps > 0 else cfg.passes * math.ceil(n / cfg.batch_size)


@contextlib.contextmanager
def selector_lora(model, cfg: SelectConfig):
    """A fresh LoRA on all projections for the selector's own training, and the AdamW that trains
    it (inner_lr, no weight decay); the LoRA is removed afterwards: the caller's model comes back
    with its original Linear layers, flags and weights."""
    if M.lora_modules(model):
        raise ValueError("the model already has LoRA adapters; select on the base model")
    if cfg.lora_layers < 0:
        raise ValueError(f"--select-lora-layers {cfg.lora_layers}: a number of blocks, 0 for all")
    flags, training = {n: p.requires_grad for n, p in model.named_parameters()}, model.training
    torch.manual_seed(cfg.seed)  # the adapter init (lora_A) draws from the global generator
    M.add_lora(model, cfg.lora_rank, cfg.lora_alpha, M.LORA_TARGETS)
    if cfg.lora_layers:  # adapters on the last blocks only (all, if fewer): the backward stops below them
        first = max(0, len(model.layers) - cfg.lora_layers)
        for name, lora in M.lora_modules(model).items():
            if int(name.split(".")[1]) < first:  # layers.<i>.<block>.<proj>
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, lora.base)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        yield params, torch.optim.AdamW(params, lr=cfg.inner_lr, weight_decay=0.0)
    finally:
        M.remove_lora(model)  # unwrap, never merge
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(training)


def model_step(meter: Meter, opt, params, grads):
    """One optimizer step of the selector's LoRA on gradients taken with autograd.grad (nothing
    else writes .grad), counted in the meter."""
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    meter.steps += 1


def require(samples, what: str, selector: str):
    if not samples:
        raise ValueError(f"selector {selector!r} needs a non-empty {what} set")


# ----------------------------------------------------------------------------- Pharmacist


def outer_grad(meter: Meter, model, params, batch_v, batch_h, lam: float, alpha: float):
    """g = ∇F at the current θ, F(θ) = L_v(θ) − λ·L_h(θ̃), θ̃ = θ − α·∇L_h(θ)/‖∇L_h(θ)‖
    (Booster's simulated harmful step, defenses.simulated_harmful_step: first order, ∇_θ L_h(θ̃)
    is taken at θ̃). Returns g and the losses (F, L_v, L_h(θ̃)) as floats, with how far the safety
    term turns g: cos_vh = cos(∇L_v, ∇L_h(θ̃)) and cos_g_v = cos(g, ∇L_v) (at 1, λ changes no
    first-order ranking: the cosine scores see g's direction only)."""
    L_v = meter.losses(model, batch_v).mean()
    g = g_v = meter.grad(L_v, params)
    F, L_h, cos_vh = L_v.item(), float("nan"), float("nan")
    if lam:
        _, _, L_h_t, g_h = simulated_harmful_step(lambda: meter.losses(model, batch_h).mean(), params, alpha,
                                                  meter.grad)  # L_h(θ̃), ∇L_h(θ̃)
        L_h = L_h_t.item()
        F = L_v.item() - lam * L_h
        g = [a - lam * b for a, b in zip(g, g_h)]  # g = ∇L_v − λ·∇L_h(θ̃)
        cos_vh = cosine(g_v, g_h)
    return g, dict(F=F, L_v=L_v.item(), L_h=L_h, cos_vh=cos_vh, cos_g_v=cosine(g, g_v))


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """cos between two gradients given per parameter."""
    return float(sum((x.float() * y.float()).sum() for x, y in zip(a, b)) / (global_norm(a) * global_norm(b) + 1e-12))


def score_pass(meter: Meter, model, params, batches, g, cfg: SelectConfig, bar=None) -> np.ndarray:
    """cos(∇ℓ_b(θ), g) of every pool row (∇ℓ_bᵀg without cfg.normalize), every row at the same θ
    against the same g: one forward and one backward a batch, the dots formed in the backward by
    model.sample_grad_dots, nothing trained. Under torchrun each process scores its own batches."""
    device, g_norm = next(model.parameters()).device, float(global_norm(g))
    scores = np.zeros(sum(len(b["index"]) for b in batches))
    for i, b in enumerate(batches):
        if i % P.world() == P.rank():
            with M.sample_grad_dots(model, params, g, norms=cfg.normalize) as probe:
                losses = meter.losses(model, {k: v.to(device) for k, v in b.items()})
            meter.grad(losses.sum(), params)  # for the hooks only
            dots = probe.dots.double()
            if cfg.normalize:
                dots = dots / (probe.sq_norms.double().sqrt().clamp_min(1e-30) * max(g_norm, 1e-30))
            scores[b["index"].numpy()] = dots.cpu().numpy()
        if bar is not None:
            bar.update()
    return P.summed(scores, device)  # each row was scored on one rank


def weighted_losses(meter: Meter, model, batch, w: torch.Tensor) -> torch.Tensor:
    """w_b·ℓ_b(θ) of every row of a (CPU) batch, with a graph; w holds the whole pool's weights."""
    losses = meter.losses(model, {k: v.to(next(model.parameters()).device) for k, v in batch.items()})
    return w[batch["index"].to(w.device)].to(losses.dtype) * losses


def inner_pass(meter: Meter, opt, model, params, batches, w: torch.Tensor, bar=None):
    """One pass of the inner training: AdamW on mean_B(w_b·ℓ_b(θ)) batch by batch (w fixed)."""
    for b in batches:
        model_step(meter, opt, params, meter.grad(weighted_losses(meter, model, b, w).mean(), params))
        if bar is not None:
            bar.update()


def pool_grad(meter: Meter, model, params, batches, w: torch.Tensor) -> list[torch.Tensor]:
    """∇_θ mean_i w_i·ℓ_i(θ) over the whole pool (the look-ahead's inner step direction)."""
    total = [torch.zeros_like(p) for p in params]
    for b in batches:
        grads = meter.grad(weighted_losses(meter, model, b, w).sum() / len(w), params)
        total = [t + x for t, x in zip(total, grads)]
    return total


def lookahead_grad(meter: Meter, model, params, batches, w, batch_v, batch_h, cfg: SelectConfig):
    """g = ∇F(θ⁺) at the look-ahead point θ⁺ = θ − η·∇ mean_i w_i·ℓ_i(θ) (learning to reweight):
    then ∂F(θ⁺)/∂w_b = −(η/N)·∇ℓ_b(θ)ᵀg exactly. θ comes back bit for bit."""
    with perturb(params, pool_grad(meter, model, params, batches, w), -cfg.eta):
        return outer_grad(meter, model, params, batch_v, batch_h, cfg.lam, cfg.alpha)


def standardised(h: np.ndarray) -> np.ndarray:
    """(h − mean h) / std h: one pass's hypergradients in units of their spread over the pool."""
    return (h - h.mean()) / max(float(h.std()), 1e-30)


def pharmacist_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                      progress: bool = True, log=None, checkpoint=None) -> Selection:
    """The bilevel selector (mode "bilevel"), one outer step a pass, or its first step alone
    (mode "first_order", the default: first_order_select).

    bilevel, for p = 0 .. passes−1:
        θ_p   p > 0: one pass of the inner training on mean_b w_b(s)·ℓ_b(θ)     (inner_pass)
        g_p   = ∇F(θ_p) on `outer_batch_size` rows, held for the pass            (outer_grad;
              with `lookahead` at θ_p − η·∇ mean_i w_i·ℓ_i(θ_p): lookahead_grad)
        h_b   = cos(∇ℓ_b(θ_p), g_p), every row at θ_p against g_p                (score_pass)
        s     ← s + outer_lr·γ^p·z,  z = standardised(h)  (w = N·softmax(s) ← w·exp(outer_lr·γ^p·z))
    ∂F/∂w_b = −(η/N)·∇ℓ_bᵀg, so raising the weights of rows with large h_b descends F; the
    exponentiated-gradient step (mirror descent on the simplex of weights) moves each row by its
    own evidence, in units of the pass's spread; γ = outer_decay < 1 shrinks the later steps (a
    decaying step: the passes at a trained adapter correct the first, which ranks best on its own
    where the wording is held out, docs/RESULTS.md "Selection"). At p = 0 the weights are 1 and the
    adapter fresh: the first step ranks exactly as the first-order score. score = the final logit s_b."""
    if cfg.mode not in MODES:
        raise ValueError(f"select mode {cfg.mode!r}: choose {' or '.join(MODES)}")
    require(pool, "pool", "pharmacist")
    require(validation, "validation", "pharmacist")
    if cfg.lam:
        require(harmful, "harmful", "pharmacist")
    if cfg.mode == "first_order":
        return first_order_select(model, tokenizer, pool, validation, harmful, cfg, progress, log, checkpoint)
    device = next(model.parameters()).device
    examples = encode_samples(pool, tokenizer, cfg.max_len)
    batches = Batches(examples, cfg.batch_size, tokenizer.pad_id, seed=cfg.seed)
    next_outer = OuterStreams(validation, harmful, tokenizer, cfg, device)
    s = torch.zeros(len(pool), dtype=torch.float64, device=device)  # the selector's logits
    meter, info, n_batches, scoring = Meter(), {}, len(batches), batches.epoch(0)  # every pass scores in one order
    with selector_lora(model, cfg) as (params, opt):
        ck = Checkpoint(checkpoint, 1, writes=P.is_main(), params=params, opt=opt, logits=[s], meter=meter,
                        outer=next_outer)  # at every pass boundary
        start, values = ck.load()
        info = values.get("info", info)
        ck.mark(start, info=info)
        per_pass = 2 * n_batches + (n_batches if cfg.lookahead else 0)
        bar = tqdm(total=cfg.passes * per_pass - n_batches, initial=max(0, start * per_pass - n_batches),
                   desc="pharmacist (bilevel)", disable=not progress)
        with ck.saved_on_interrupt():
            for p in range(start, cfg.passes):
                w = len(pool) * torch.softmax(s, dim=0)
                if p:  # θ_p: the inner training on the current weights
                    inner_pass(meter, opt, model, params, batches.epoch(p), w, bar)
                if cfg.lookahead:
                    g, info = lookahead_grad(meter, model, params, scoring, w, *next_outer(), cfg)
                    bar.update(n_batches)
                else:
                    g, info = outer_grad(meter, model, params, *next_outer(), cfg.lam, cfg.alpha)
                z = standardised(score_pass(meter, model, params, scoring, g, cfg, bar))
                s += cfg.outer_lr * cfg.outer_decay ** p * torch.as_tensor(z, device=device)  # w ← w·exp(·), renormalised
                info = dict(info, passes=p + 1)
                bar.set_postfix(F=f"{info['F']:.3f}", L_v=f"{info['L_v']:.3f}", L_h=f"{info['L_h']:.3f}")
                if log:
                    log(dict(step=p + 1, **info))
                ck.mark(p + 1, info=info)
    scores = s.double().cpu().numpy()
    return Selection(scores, meter.stats(**info, scores=score_stats(scores)))


def first_order_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                       progress: bool = True, log=None, checkpoint=None) -> Selection:
    """One scoring pass per checkpoint, no per-sample weights (TracIn / LESS style):
        score_b = mean_c cos(∇ℓ_b(θ_c), g_c),   g_c = ∇F(θ_c) on `outer_batch_size` rows
    θ_0 is the fresh adapter (B = 0: ∇ℓ_b is then ∇_W ℓ_b projected through the random A, a
    random projection of the full gradient as in LESS); between checkpoints the adapter trains
    one pass on the pool with plain SFT. It is the bilevel selector's first step (w = 1);
    `normalize` false ranks by the raw dot product ∇ℓ_bᵀg instead of the cosine."""
    device = next(model.parameters()).device
    batches = Batches(encode_samples(pool, tokenizer, cfg.max_len), cfg.batch_size, tokenizer.pad_id, seed=cfg.seed)
    next_outer = OuterStreams(validation, harmful, tokenizer, cfg, device)
    meter, scores, info, n_batches, scoring = Meter(), np.zeros(len(pool)), {}, len(batches), batches.epoch(0)
    ones = torch.ones(len(pool), device=device)
    with selector_lora(model, cfg) as (params, opt):
        bar = tqdm(total=cfg.checkpoints * (n_batches + 1) + (cfg.checkpoints - 1) * n_batches,
                   desc="pharmacist (first order)", disable=not progress)
        for c in range(cfg.checkpoints):
            if c:  # one SFT pass between checkpoints
                inner_pass(meter, opt, model, params, batches.epoch(c), ones, bar)
            g, info = outer_grad(meter, model, params, *next_outer(), cfg.lam, cfg.alpha)
            bar.update()
            scores += score_pass(meter, model, params, scoring, g, cfg, bar) / cfg.checkpoints
            if log:
                log(dict(checkpoint=c, **info))
    return Selection(scores, meter.stats(**info, scores=score_stats(scores)))


class OuterStreams:
    """The next (validation batch, harmful batch or None) of the outer loss, at each call."""

    def __init__(self, validation, harmful, tokenizer, cfg: SelectConfig, device):
        outer = replace(cfg, batch_size=cfg.outer_batch_size)
        self.v = stream(validation, tokenizer, outer, cfg.seed + 1, device)
        self.h = stream(harmful, tokenizer, outer, cfg.seed + 2, device) if cfg.lam else None

    def __call__(self):
        return self.v(), self.h() if self.h else None

    def state_dict(self) -> dict:
        return {"v": self.v.drawn, "h": self.h.drawn if self.h else 0}

    def load_state_dict(self, state: dict):
        self.v.drawn = state["v"]
        if self.h:
            self.h.drawn = state["h"]



def score_stats(scores) -> dict:
    """Quantiles and the number of distinct values of the scores (a collapse to signs shows)."""
    s = np.asarray(scores, dtype=np.float64)
    q = np.quantile(s, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
    return dict(distinct=int(len(np.unique(np.round(s, 12)))), std=float(s.std()),
                quantiles=dict(zip(("min", "q10", "q25", "median", "q75", "q90", "max"), map(float, q))))


# ----------------------------------------------------------------------------- baselines


def full_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                progress: bool = True, log=None, checkpoint=None) -> Selection:
    """Every row scores 1, and rows_kept keeps them all whatever --select-keep says."""
    return Selection(np.ones(len(pool)), dict(steps=0, tokens=0))


def random_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                  progress: bool = True, log=None, checkpoint=None) -> Selection:
    """Seeded uniform random scores: a random subset of the requested size."""
    rng = np.random.default_rng(cfg.seed)
    return Selection(rng.random(len(pool)), dict(steps=0, tokens=0))


def oracle_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                  progress: bool = True, log=None, checkpoint=None) -> Selection:
    """An ablation, not a method: reads each row's planted kind (`category`, which no selector
    sees) and ranks the truly clean rows (clean refusals) first, in seeded random order, so
    keeping k <= their count gives a random k of them: what denoising alone buys."""
    rng = np.random.default_rng(cfg.seed)
    clean = np.array([s.category == "refusal" for s in pool], dtype=float)
    return Selection(clean + rng.random(len(pool)) * 0.5, dict(steps=0, tokens=0))


def seal_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                progress: bool = True, log=None, checkpoint=None) -> Selection:
    """SEAL (Shen et al., ICLR 2025), its memory-efficient penalty-based algorithm, with the
    validation set as SEAL's safe set. Each step, one AdamW step on the model and one Adam step
    on the logits:
        model:    γ·L_safe(θ) + (1−γ)·mean_B(w_i·ℓ_i(θ))      (w held fixed)
        selector: mean_B(w_i(s)·ℓ_i)                         (ℓ held fixed)
    SEAL lowers γ by 0.03 each epoch from 1; over a couple of passes we keep it constant."""
    require(pool, "pool", "seal")
    require(validation, "validation", "seal")
    device = next(model.parameters()).device
    next_pool = stream(pool, tokenizer, cfg, cfg.seed, device)
    next_v = stream(validation, tokenizer, cfg, cfg.seed + 1, device)
    weights = SampleWeights(len(pool), cfg.weighting, cfg.selector_lr, device=device)
    meter, steps, info = Meter(), step_budget(cfg, len(pool)), {}
    with selector_lora(model, cfg) as (params, opt):
        ck = Checkpoint(checkpoint, cfg.save_every, writes=P.is_main(), params=params, opt=opt, weights=weights, meter=meter,
                            pool=next_pool, validation=next_v)
        start, values = ck.load()
        info = values.get("info", info)
        ck.mark(start, info=info)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc="seal", disable=not progress)
        with ck.saved_on_interrupt():
            for step in bar:
                batch, batch_v = next_pool(), next_v()
                losses = meter.losses(model, batch)
                L_safe = meter.losses(model, batch_v).mean()
                w = weights.weights(batch["index"])
                loss = cfg.gamma * L_safe + (1 - cfg.gamma) * (w.detach() * losses).mean()
                model_step(meter, opt, params, meter.grad(loss, params))
                weights.step((w * losses.detach()).mean())
                info = dict(loss=loss.item(), L_safe=L_safe.item(), L_pool=losses.mean().item())
                bar.set_postfix({k: f"{v:.3f}" for k, v in info.items()})
                if log:
                    log(dict(step=step + 1, **info))
                ck.mark(step + 1, info=info)
    scores = weights.logits.detach().double().cpu().numpy()
    return Selection(scores, meter.stats(**info))


def loss_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                progress: bool = True, log=None, checkpoint=None) -> Selection:
    """Reducible loss (RHO-LOSS, Mindermann et al., ICML 2022) with the validation set as the
    holdout: score_i = ℓ_i(θ₀) − ℓ_i(θ_v), the loss under the base model minus the loss under a
    LoRA briefly trained on the validation set (`steps`, or `passes` passes over the pool's
    batch count). High for rows the validation data makes easier: learnable, not yet learnt."""
    require(pool, "pool", "loss")
    require(validation, "validation", "loss")
    device = next(model.parameters()).device
    pool_batches = [{k: v.to(device) for k, v in b.items()} for b in
                    Batches(encode_samples(pool, tokenizer, cfg.max_len), cfg.batch_size,
                            tokenizer.pad_id, shuffle=False).epoch(0)]
    next_v = stream(validation, tokenizer, cfg, cfg.seed + 1, device)
    meter, steps = Meter(), step_budget(cfg, len(pool))
    scores = np.zeros(len(pool))
    with selector_lora(model, cfg) as (params, opt):
        for b in pool_batches:  # base model: the LoRA is still zero (B = 0)
            scores[b["index"].cpu().numpy()] = meter.losses(model, b, grad=False).double().cpu().numpy()
        ck = Checkpoint(checkpoint, cfg.save_every, writes=P.is_main(), params=params, opt=opt, meter=meter, validation=next_v)
        start, _ = ck.load()
        ck.mark(start)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc="loss (holdout model)", disable=not progress)
        with ck.saved_on_interrupt():
            for step in bar:
                L_v = meter.losses(model, next_v()).mean()
                model_step(meter, opt, params, meter.grad(L_v, params))
                bar.set_postfix(L_v=f"{L_v.item():.3f}")
                if log:
                    log(dict(step=step + 1, L_v=L_v.item()))
                ck.mark(step + 1)
        for b in pool_batches:
            scores[b["index"].cpu().numpy()] -= meter.losses(model, b, grad=False).double().cpu().numpy()
    return Selection(scores, meter.stats())


SELECTORS = {"full": full_select, "random": random_select, "pharmacist": pharmacist_select,
             "seal": seal_select, "loss": loss_select, "oracle": oracle_select}


def select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
           progress: bool = True, log=None, checkpoint=None) -> Selection:
    """Score every pool row with cfg.selector (see SELECTORS), with k the rows to keep
    (rows_kept); the model comes back unchanged.
    `checkpoint`: a file the selector's loop is saved to and resumed from (bilevel Pharmacist,
    SEAL and the loss selector's holdout training; the one-pass selectors have nothing to save)."""
    if cfg.selector not in SELECTORS:
        raise ValueError(f"unknown selector {cfg.selector!r} (known: {', '.join(SELECTORS)})")
    if not pool:
        raise ValueError("the pool is empty: nothing to select from")
    k = rows_kept(cfg, len(pool))  # a bad --select-keep fails before any work
    selection = SELECTORS[cfg.selector](model, tokenizer, pool, validation, harmful, cfg,
                                        progress=progress, log=log, checkpoint=checkpoint)
    if len(selection.scores) != len(pool) or not np.all(np.isfinite(selection.scores)):
        raise RuntimeError(f"selector {cfg.selector!r} returned bad scores (NaN or wrong length)")
    return replace(selection, k=k)
