"""Pharmacist: learn which alignment samples to keep, and the baselines it is compared with.

    selection = select(model, tokenizer, pool, validation, harmful, SelectConfig(keep=0.4))
    ranks, selected = rank(selection.scores, keep_count(0.4, len(pool)))

THIS IS OUR RECONSTRUCTION of the method described in "Pharmacist: Safety Alignment Data
Curation for LLMs against Harmful Fine-tuning" (arXiv 2510.10085). The paper's code is not
public here; we implement the formulation written down in DESIGN.md ("Pharmacist"):

  pool D_a (N rows), validation set D_v (clean refusals), harmful set D_h (harmful Q&A)
  selector    one logit s_i per pool row,  w = N·softmax(s)                (mean weight 1)
  inner       θ*(s) = argmin_θ  mean_i w_i·ℓ_i(θ)                          (LoRA parameters θ)
  outer       min_s F(θ*(s)),  F(θ) = L_v(θ) − λ·L_h(θ − α·∇L_h(θ)/‖∇L_h(θ)‖)
              stay close to good refusals, and keep the harmful loss high even after a simulated
              harmful fine-tuning step (Booster's first-order simulation).
  hypergradient by a one-step look-ahead (learning to reweight, Ren et al. 2018):
              θ⁺ = θ − η·∇_θ mean_B(w_i·ℓ_i(θ))
              ∂F(θ⁺)/∂w_i = −(η/|B|)·∇ℓ_i(θ)ᵀ g,          g = ∇F(θ⁺)
  and every ∇ℓ_i(θ)ᵀg of the batch from two extra forward passes (DARTS, Liu et al. 2019):
              ∇ℓ_i(θ)ᵀg ≈ (ℓ_i(θ + εg) − ℓ_i(θ − εg)) / 2ε,   ε = eps/‖g‖
  so no per-sample backward pass is ever needed. Inner step and selector step alternate;
  rows are ranked by their final logit s_i.

Baselines under the same interface (a function returning a `Selection`, one score per row,
higher = keep): `full` (keep everything), `random`, `seal` (SEAL, Shen et al., ICLR 2025: the
penalty-based bilevel selector, its memory-efficient variant) and `loss` (reducible loss,
RHO-LOSS, Mindermann et al., ICML 2022). `SampleWeights` is shared with BDS (defenses.py).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import model as M
from data.batches import Batches, Stream, encode_samples, sample_losses

# ----------------------------------------------------------------------------- per-sample weights


class SampleWeights(nn.Module):
    """One learnable logit per sample, turned into weights, with its own Adam optimizer.

    softmax: w = N·softmax(s), so the weights always average 1 over the N samples.
    sigmoid: w = 2·sigmoid(s), independent weights in (0, 2) (SEAL's other choice).
    Logits start at 0, so every weight starts at exactly 1 either way.

    `weights(index)` of a batch has the value N·softmax(s)[index], but its gradient only moves
    weight between the rows of that batch (the batch's total weight is held fixed):
        w_B = (Σ_{j∈B} w_j)·softmax(s_B)     (same value; a centred gradient, 0 off the batch)
    With the full softmax, every row off the batch would get a small gradient at each step,
    and Adam (which divides by each coordinate's own gradient scale) would turn it into a full
    step: rows seen late in the first pass would drift by their position in the order.
    `weights()` (no index) is the whole pool, with the full softmax gradient.
    """

    def __init__(self, n: int, weighting: str = "softmax", lr: float = 0.05, device=None):
        super().__init__()
        if weighting not in ("softmax", "sigmoid"):
            raise ValueError(f"weighting {weighting!r}: choose softmax or sigmoid")
        if n < 1:
            raise ValueError(f"SampleWeights needs at least one sample, got n={n}")
        self.n, self.weighting = n, weighting
        self.logits = nn.Parameter(torch.zeros(n, device=device))
        self.opt = torch.optim.Adam([self.logits], lr=lr)

    def weights(self, index=None) -> torch.Tensor:
        s = self.logits
        if self.weighting == "sigmoid":  # w = 2·σ(s)
            w = 2 * torch.sigmoid(s)
            return w if index is None else w[self._index(index)]
        if index is None:  # w = N·softmax(s)
            return self.n * torch.softmax(s, dim=0)
        index = self._index(index)
        mass = (self.n * torch.softmax(s.detach(), dim=0))[index].sum()  # Σ_{j∈B} w_j, held fixed
        return mass * torch.softmax(s[index], dim=0)

    def _index(self, index) -> torch.Tensor:
        return torch.as_tensor(index, dtype=torch.long, device=self.logits.device)

    def step(self, loss: torch.Tensor) -> float:
        """One Adam step on the logits for a loss built from `weights(...)`.

        When ∂F/∂w of a batch is known by hand (Pharmacist), pass the surrogate loss
        (weights(index) · grad).sum(): its gradient through w is exactly that ∂F/∂w."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def state_dict(self, *args, **kwargs):
        """The logits and the Adam state (save it with torch.save; a resumed run continues)."""
        state = super().state_dict(*args, **kwargs)
        state["optimizer"] = copy.deepcopy(self.opt.state_dict())  # a copy, not the live moments
        return state

    def load_state_dict(self, state, strict: bool = True):
        state = dict(state)
        opt_state = state.pop("optimizer", None)
        if opt_state is None and strict:
            raise KeyError("SampleWeights state has no 'optimizer' entry (save it with .state_dict())")
        result = super().load_state_dict(state, strict=strict)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        return result


# ----------------------------------------------------------------------------- config, result


@dataclass
class SelectConfig:
    selector: str = "pharmacist"  # full|random|pharmacist|seal|loss
    keep: float = 0.4  # rows to keep: a fraction in (0, 1] or a count > 1
    passes: int = 2  # passes over the pool for the learned selectors
    steps: int = 0  # selector steps (0: `passes` passes over the pool)
    batch_size: int = 8  # pool, validation and harmful rows per step
    max_len: int = 128  # tokens per sample (prompt truncated first)
    lora_rank: int = 8  # rank of the selector's own LoRA (all projections)
    lora_alpha: float = 16.0  # LoRA scale alpha
    inner_lr: float = 5e-4  # AdamW learning rate of the inner (model) step
    eta: float = 1e-3  # Pharmacist: look-ahead learning rate η
    lam: float = 1.0  # Pharmacist: weight λ of the harmful term of the outer loss
    alpha: float = 0.1  # Pharmacist: size α of the simulated harmful step
    eps: float = 1e-2  # Pharmacist: finite-difference step, relative (ε = eps/‖g‖)
    selector_lr: float = 0.05  # Adam learning rate of the per-sample logits
    weighting: str = "softmax"  # softmax (w = N·softmax(s)) or sigmoid (w = 2·sigmoid(s))
    gamma: float = 0.9  # SEAL: weight of the validation (safe) loss in the model's loss
    seed: int = 0  # LoRA init, batch order, random scores


@dataclass
class Selection:
    scores: np.ndarray  # one score per pool row, higher = keep
    stats: dict = field(default_factory=dict)  # steps, tokens, passes, ... (for summary.json)


def keep_count(keep: float, n: int) -> int:
    """Rows to keep: `keep` is a fraction in (0, 1] of the n rows or a whole count in (1, n]."""
    if not keep > 0:
        raise ValueError(f"--keep {keep}: must be > 0 (a fraction such as 0.4, or a count such as 64)")
    if keep <= 1:
        return max(1, math.floor(keep * n + 0.5))
    if keep != int(keep):
        raise ValueError(f"--keep {keep}: above 1 it is a count of rows and must be whole")
    if keep > n:
        raise ValueError(f"--keep {int(keep)}: the pool has only {n} rows; pass a count <= {n} "
                         "or a fraction in (0, 1]")
    return int(keep)


def rank(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each row, 0 = best; mask of the k best). Ties go to the earlier row."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # by score descending, then index
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(len(scores))
    return ranks, ranks < k


# ----------------------------------------------------------------------------- shared machinery


class Meter:
    """What a selector cost: steps, forward and backward passes, tokens through the model."""

    def __init__(self):
        self.steps = self.forward = self.backward = self.tokens = 0
        self.t0 = time.perf_counter()

    def losses(self, model, batch, grad: bool = True, exact: bool = False) -> torch.Tensor:
        """ℓ_i of every row of the batch (B,), with or without a graph; `exact`: no bf16
        autocast (CUDA), the model's own precision."""
        self.forward += 1
        self.tokens += int(batch["attention_mask"].sum())
        cast = contextlib.nullcontext() if exact else M.autocast(batch["input_ids"].device)
        with torch.set_grad_enabled(grad), cast:
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
def selector_lora(model, cfg: SelectConfig, float32: bool = False):
    """A fresh LoRA on all projections for the selector's own training, removed afterwards:
    the caller's model comes back with its original Linear layers, flags and weights.
    float32: half-precision weights are cast up meanwhile (bf16 -> fp32 -> bf16 is exact)."""
    if M.lora_modules(model):
        raise ValueError("the model already has LoRA adapters; select on the base model")
    flags, training = {n: p.requires_grad for n, p in model.named_parameters()}, model.training
    half = [t for t in list(model.parameters()) + list(model.buffers())
            if float32 and t.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [t.dtype for t in half]
    for t in half:
        t.data = t.data.float()
    torch.manual_seed(cfg.seed)  # the adapter init (lora_A) draws from the global generator
    M.add_lora(model, cfg.lora_rank, cfg.lora_alpha, M.LORA_TARGETS)
    try:
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        M.remove_lora(model)  # unwrap, never merge
        for t, dtype in zip(half, dtypes):
            t.data = t.data.to(dtype)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(training)


def require(samples, what: str, selector: str):
    if not samples:
        raise ValueError(f"selector {selector!r} needs a non-empty {what} set")


# ----------------------------------------------------------------------------- Pharmacist


@torch.no_grad()
def sample_grad_dots(meter: Meter, model, params, batch, direction, eps: float) -> torch.Tensor:
    """∇ℓ_i(θ)ᵀd for every row i of the batch from two forward passes (θ restored exactly):
        ∇ℓ_i(θ)ᵀd ≈ (ℓ_i(θ + εd) − ℓ_i(θ − εd)) / 2ε,    ε = eps/‖d‖
    Both passes run without autocast, in the model's precision (float32 here): in bf16 the
    loss difference drowns in rounding (tiny model, eps 1e-2: correlation −0.8 with exact)."""
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction))
    if norm == 0:
        return torch.zeros(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    e = eps / float(norm)
    saved = [p.detach().clone() for p in params]
    try:
        for p, p0, d in zip(params, saved, direction):
            p.copy_(p0 + e * d)
        plus = meter.losses(model, batch, grad=False, exact=True)
        for p, p0, d in zip(params, saved, direction):
            p.copy_(p0 - e * d)
        minus = meter.losses(model, batch, grad=False, exact=True)
    finally:
        for p, p0 in zip(params, saved):
            p.copy_(p0)
    return (plus.double() - minus.double()) / (2 * e)


def outer_grad(meter: Meter, model, params, batch_v, batch_h, lam: float, alpha: float):
    """g = ∇F at the current θ, F(θ) = L_v(θ) − λ·L_h(θ̃), θ̃ = θ − α·∇L_h(θ)/‖∇L_h(θ)‖.
    First order (as Booster): ∇_θ L_h(θ̃) is taken at θ̃, the Jacobian of θ̃ is ignored.
    Returns g and the losses (F, L_v, L_h(θ̃)) as floats."""
    L_v = meter.losses(model, batch_v).mean()
    g = meter.grad(L_v, params)
    F, L_h = L_v.item(), float("nan")
    if lam:
        g_h0 = meter.grad(meter.losses(model, batch_h).mean(), params)  # ∇L_h(θ)
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g_h0)).clamp_min(1e-12)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, x in zip(params, g_h0):
                    p.sub_(alpha * x / norm)  # θ̃ = θ − α·∇L_h/‖∇L_h‖
            L_h_t = meter.losses(model, batch_h).mean()
            g_h = meter.grad(L_h_t, params)  # ∇L_h(θ̃)
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, saved):
                    p.copy_(p0)
        L_h = L_h_t.item()
        F = L_v.item() - lam * L_h
        g = [a - lam * b for a, b in zip(g, g_h)]  # g = ∇L_v − λ·∇L_h(θ̃)
    return g, dict(F=F, L_v=L_v.item(), L_h=L_h)


def hypergradient(meter: Meter, model, params, batch, w_batch, batch_v, batch_h, cfg: SelectConfig):
    """One look-ahead: ∂F(θ⁺)/∂w_i for the rows of the batch, and the inner gradient G.

        G  = ∇_θ mean_B(w_i·ℓ_i(θ))               (w held fixed; reused by the inner step)
        θ⁺ = θ − η·G,     g = ∇F(θ⁺)
        ∂F/∂w_i = −(η/|B|)·∇ℓ_i(θ)ᵀg              (∇ℓ_iᵀg by finite differences at θ)"""
    losses = meter.losses(model, batch)
    inner = (w_batch.detach() * losses).mean()
    G = meter.grad(inner, params)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, x in zip(params, G):
                p.sub_(cfg.eta * x)  # θ⁺ = θ − η·G
        g, info = outer_grad(meter, model, params, batch_v, batch_h, cfg.lam, cfg.alpha)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)  # back to θ, bit for bit
    dots = sample_grad_dots(meter, model, params, batch, g, cfg.eps)  # ∇ℓ_i(θ)ᵀg
    grad_w = -(cfg.eta / len(losses)) * dots
    return grad_w.to(w_batch.dtype), G, dict(info, loss=losses.mean().item())


def pharmacist_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                      progress: bool = True, log=None) -> Selection:
    """Alternate a selector step (look-ahead hypergradient) and an inner step (AdamW on the
    weighted pool loss, reusing the look-ahead's gradient G); score = the final logit s_i."""
    require(pool, "pool", "pharmacist")
    require(validation, "validation", "pharmacist")
    if cfg.lam:
        require(harmful, "harmful", "pharmacist")
    device = next(model.parameters()).device
    streams = [stream(d, tokenizer, cfg, cfg.seed + i, device) if d else None
               for i, d in enumerate((pool, validation, harmful))]
    next_pool, next_v, next_h = streams
    weights = SampleWeights(len(pool), cfg.weighting, cfg.selector_lr, device=device)
    meter, steps, info = Meter(), step_budget(cfg, len(pool)), {}
    with selector_lora(model, cfg, float32=True) as params:  # float32 for the finite differences
        opt = torch.optim.AdamW(params, lr=cfg.inner_lr, weight_decay=0.0)
        bar = tqdm(range(steps), desc="pharmacist", disable=not progress)
        for step in bar:
            batch = next_pool()
            idx = batch["index"]
            w = weights.weights(idx)
            grad_w, G, info = hypergradient(meter, model, params, batch, w, next_v(),
                                            next_h() if next_h else None, cfg)
            weights.step((w * grad_w).sum())  # selector: Adam on s with ∂F/∂w through w(s)
            for p, x in zip(params, G):  # inner: AdamW on mean_B(w_i·ℓ_i), w as before the step
                p.grad = x
            opt.step()
            opt.zero_grad(set_to_none=True)
            meter.steps += 1
            bar.set_postfix(F=f"{info['F']:.3f}", L_v=f"{info['L_v']:.3f}", L_h=f"{info['L_h']:.3f}")
            if log:
                log(dict(step=step + 1, **info))
    scores = weights.logits.detach().double().cpu().numpy()
    return Selection(scores, meter.stats(**info))


# ----------------------------------------------------------------------------- baselines


def full_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                progress: bool = True, log=None) -> Selection:
    """Every row scores 1: the caller keeps the whole pool (train.py ignores --keep for full)."""
    return Selection(np.ones(len(pool)), dict(steps=0, tokens=0))


def random_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                  progress: bool = True, log=None) -> Selection:
    """Seeded uniform random scores: a random subset of the requested size."""
    rng = np.random.default_rng(cfg.seed)
    return Selection(rng.random(len(pool)), dict(steps=0, tokens=0))


def seal_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                progress: bool = True, log=None) -> Selection:
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
    with selector_lora(model, cfg) as params:
        opt = torch.optim.AdamW(params, lr=cfg.inner_lr, weight_decay=0.0)
        bar = tqdm(range(steps), desc="seal", disable=not progress)
        for step in bar:
            batch, batch_v = next_pool(), next_v()
            losses = meter.losses(model, batch)
            L_safe = meter.losses(model, batch_v).mean()
            w = weights.weights(batch["index"])
            loss = cfg.gamma * L_safe + (1 - cfg.gamma) * (w.detach() * losses).mean()
            meter.backward += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            weights.step((w * losses.detach()).mean())
            meter.steps += 1
            info = dict(loss=loss.item(), L_safe=L_safe.item(), L_pool=losses.mean().item())
            bar.set_postfix({k: f"{v:.3f}" for k, v in info.items()})
            if log:
                log(dict(step=step + 1, **info))
    scores = weights.logits.detach().double().cpu().numpy()
    return Selection(scores, meter.stats(**info))


def loss_select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
                progress: bool = True, log=None) -> Selection:
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
    with selector_lora(model, cfg) as params:
        for b in pool_batches:  # base model: the LoRA is still zero (B = 0)
            scores[b["index"].cpu().numpy()] = meter.losses(model, b, grad=False).double().cpu().numpy()
        opt = torch.optim.AdamW(params, lr=cfg.inner_lr, weight_decay=0.0)
        bar = tqdm(range(steps), desc="loss (holdout model)", disable=not progress)
        for step in bar:
            L_v = meter.losses(model, next_v()).mean()
            meter.backward += 1
            opt.zero_grad(set_to_none=True)
            L_v.backward()
            opt.step()
            meter.steps += 1
            bar.set_postfix(L_v=f"{L_v.item():.3f}")
            if log:
                log(dict(step=step + 1, L_v=L_v.item()))
        for b in pool_batches:
            scores[b["index"].cpu().numpy()] -= meter.losses(model, b, grad=False).double().cpu().numpy()
    return Selection(scores, meter.stats())


SELECTORS = {"full": full_select, "random": random_select, "pharmacist": pharmacist_select,
             "seal": seal_select, "loss": loss_select}


def select(model, tokenizer, pool, validation, harmful, cfg: SelectConfig,
           progress: bool = True, log=None) -> Selection:
    """Score every pool row with cfg.selector (see SELECTORS); the model comes back unchanged."""
    if cfg.selector not in SELECTORS:
        raise ValueError(f"unknown selector {cfg.selector!r} (known: {', '.join(SELECTORS)})")
    if not pool:
        raise ValueError("the pool is empty: nothing to select from")
    if cfg.selector != "full":  # full keeps every row whatever --keep says
        keep_count(cfg.keep, len(pool))  # a bad --keep fails before any work
    selection = SELECTORS[cfg.selector](model, tokenizer, pool, validation, harmful, cfg,
                                        progress=progress, log=log)
    if len(selection.scores) != len(pool) or not np.all(np.isfinite(selection.scores)):
        raise RuntimeError(f"selector {cfg.selector!r} returned bad scores (NaN or wrong length)")
    return selection
