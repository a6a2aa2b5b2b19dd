"""Defenses against harmful fine-tuning, as step functions the one training loop calls.

Alignment stage: SFT, Vaccine (Huang et al. 2024), RepNoise (Rosati et al. 2024), Booster
(Huang et al. 2024), T-Vaccine (Liu et al. 2025). Tuning stage: BDS, the Bayesian Data Scheduler
(Hu et al. 2025). Every defense is

    grads, stats = STEPS[name](ctx, batch)

`grads` are the gradients of the trainable (LoRA) parameters, in the order of `ctx.params`, taken
with `torch.autograd.grad`: nothing is written to `.grad`, so the loop accumulates and clips them.
A gradient is None for a parameter the step keeps frozen (T-Vaccine's unsampled layers): the loop
leaves its `.grad` None, so AdamW skips it (no momentum, no weight decay), as a parameter with
requires_grad=False is skipped in the reference.
`stats` holds floats, at least `loss` (the loss of `batch`). A step leaves every parameter exactly
as it found it (Booster moves the weights for one pass and copies them back). `PASSES` says what a
step costs in forward+backward passes. We read the reference implementations named below for the
details; the code is ours.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from data.batches import IGNORE, sample_losses, token_mean


@dataclass
class DefenseConfig:
    """Hyperparameters of the defenses; the defaults are the reference implementations' runs, but
    for RepNoise's alpha (below)."""
    rho: float = 2.0  # Vaccine: norm of the perturbation of the attention outputs (its README runs 2)
    tvaccine_rho: float = 3.0  # T-Vaccine: norm of the perturbation (its README runs rho 3)
    tvaccine_layers: int = 8  # T-Vaccine S: layers perturbed and trained at a time
    tvaccine_every: int = 20  # T-Vaccine J: sample new layers every J steps
    tvaccine_probe_every: int = 200  # T-Vaccine K: recompute the harmful-gradient norms every K steps
    # RepNoise alpha: weight of the ascent on the harmful loss. representation-noising loss.py
    # `rep_noise_loss` defaults to alpha 1; we run 0.1, as the re-implementations this paper's line
    # of work compares with run it (git-disl/Booster script/alignment/repNoise.sh, Lslland/T-Vaccine
    # script/alignment/Repnoise.sh: alpha 0.1, beta 0.001)
    repnoise_alpha: float = 0.1
    repnoise_beta: float = 0.001  # RepNoise beta: weight of the MMD to Gaussian noise (all of them: 0.001)
    repnoise_lens_layers: int = 0  # RepNoise: layers whose logit lens it ascends (0: every layer, the reference)
    booster_lam: float = 5.0  # Booster lambda: weight of the harmful-loss-reduction penalty
    booster_alpha: float = 0.1  # Booster alpha: size of the simulated harmful step
    bds_lr: float = 5e-3  # BDS: Adam learning rate of the per-sample logits (or of the scorer)
    bds_weighting: str = "softmax"  # BDS: w = N*softmax(u) (softmax) or w = 2*sigmoid(u) (sigmoid)
    bds_safe_weight: float = 1.0  # BDS: weight of the alignment loss L_safe in the model's loss
    bds_amortized: bool = False  # BDS: weights from a small network over pooled hidden states
    bds_scorer_width: int = 64  # BDS amortized: hidden width of the scorer network


BDS_OBJECTS = ("weights", "scorer", "scorer_opt")  # state entries that BDS builds before loading


@dataclass
class Context:
    """What a step needs besides its batch. `state` persists across steps and is checkpointed."""
    model: nn.Module
    params: list
    cfg: DefenseConfig = field(default_factory=DefenseConfig)
    next_harmful: Callable[[], dict] | None = None  # a batch of harmful prompts + harmful answers
    next_align: Callable[[], dict] | None = None  # a batch of alignment data (refusals)
    n_samples: int = 0  # rows of the training set (BDS keeps a weight for each)
    step: int = 0  # the optimizer step, set by the loop
    state: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Plain values as they are; modules and optimizers as their state dicts."""
        return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in self.state.items()}

    def load_state_dict(self, saved: dict):
        held = sorted(k for k in BDS_OBJECTS if k in saved)
        if held:
            bds_setup(self)  # build the objects, then fill them
            built = sorted(k for k in BDS_OBJECTS if k in self.state)
            if held != built:
                raise ValueError(f"the checkpoint holds BDS state {held} but this run builds {built}: "
                                 "was --defense-bds-amortized changed?")
        for k, v in saved.items():
            if hasattr(self.state.get(k), "load_state_dict"):
                self.state[k].load_state_dict(v)
            else:
                self.state[k] = v


# ----------------------------------------------------------------------------- per-sample weights (BDS and Pharmacist)


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
    `weights()` (no index) is the whole pool, with the full softmax gradient (BDS indexes it, as
    its reference does).
    """

    def __init__(self, n: int, weighting: str = "softmax", lr: float = 0.05, optimizer: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), device=None):
        super().__init__()
        if weighting not in ("softmax", "sigmoid"):
            raise ValueError(f"weighting {weighting!r}: choose softmax or sigmoid")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer {optimizer!r}: choose adam or sgd")
        if n < 1:
            raise ValueError(f"SampleWeights needs at least one sample, got n={n}")
        self.n, self.weighting = n, weighting
        self.logits = nn.Parameter(torch.zeros(n, device=device))
        # Adam moves every logit that gets a gradient by about lr, whatever the gradient's size
        # (BDS); SGD keeps the sizes (Pharmacist, whose hypergradients are normalised first)
        self.opt = (torch.optim.Adam([self.logits], lr=lr, betas=betas) if optimizer == "adam"
                    else torch.optim.SGD([self.logits], lr=lr))

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
        """One optimizer step on the logits for a loss built from `weights(...)`.

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


# ----------------------------------------------------------------------------- shared helpers

def losses(model, batch) -> torch.Tensor:
    """Per-sample loss (B,) on the response tokens (right padding needs no attention mask)."""
    return sample_losses(model.hidden(batch["input_ids"]), batch["labels"], model.head)


def batch_loss(model, batch) -> torch.Tensor:
    """The loss of a batch: the mean over all its response tokens, as the HF Trainer computes it
    in the reference implementations (a long answer weighs by its length; per-sample weights use
    `losses`)."""
    return token_mean(losses(model, batch), batch["labels"])


def grads(loss, params) -> list[torch.Tensor]:
    """d loss / d params; zeros for parameters the loss does not reach."""
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def global_norm(tensors) -> torch.Tensor:
    """The L2 norm of all the tensors taken together, in float32."""
    return torch.sqrt(sum(t.float().pow(2).sum() for t in tensors))


@contextlib.contextmanager
def hooks(modules, fn):
    """Forward hooks: fn(i, output) runs after modules[i]; a non-None return replaces the output.
    The hooks are removed on exit, also after an error."""
    handles = [m.register_forward_hook(lambda _m, _args, out, i=i: fn(i, out))
               for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def perturb(params, direction, scale: float):
    """Move the parameters to p + scale·d for the duration; copied back bit for bit on exit."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d.to(p.dtype), alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def simulated_harmful_step(harmful_loss, params, alpha: float, grad=grads):
    """Booster's simulated harmful fine-tuning step, shared with Pharmacist's outer loss: the
    harmful loss h and its gradient at θ, then at θ̃ = θ − alpha·∇h(θ)/‖∇h(θ)‖ (θ copied back bit
    for bit). First order: ∇h(θ̃) is taken at θ̃, the Jacobian of θ̃ is ignored. `harmful_loss()`
    is h at the current parameters, `grad(loss, params)` its gradient.
    Returns h(θ), ∇h(θ), h(θ̃), ∇h(θ̃)."""
    h = harmful_loss()
    g = grad(h, params)
    with perturb(params, g, -alpha / (float(global_norm(g)) + 1e-7)):  # git-disl/Booster's 1e-7
        h_after = harmful_loss()
        g_after = grad(h_after, params)
    return h, g, h_after, g_after


@contextlib.contextmanager
def add_to_attention(model, deltas: dict):
    """Add deltas[i] (B, T, hidden) to the output of layer i's attention module."""
    attn = [layer.self_attn for layer in model.layers]
    with hooks(attn, lambda i, out: out + deltas[i].to(out.dtype) if i in deltas else None):
        yield


def attention_grads(model, batch, layers) -> tuple[list[torch.Tensor], torch.Tensor]:
    """dL/d(attention output) of the given layers, and the loss L, in one forward and backward.

    Adding a zero tensor that requires grad to each output makes its gradient that of the output."""
    B, T = batch["input_ids"].shape
    zeros = {i: torch.zeros(B, T, model.config.hidden_size, device=batch["input_ids"].device,
                            requires_grad=True) for i in layers}
    with add_to_attention(model, zeros):
        loss = batch_loss(model, batch)
    return list(torch.autograd.grad(loss, list(zeros.values()))), loss.detach()


# ----------------------------------------------------------------------------- alignment stage

def sft_step(ctx: Context, batch):
    """Plain fine-tuning: the batch's token-mean loss."""
    loss = batch_loss(ctx.model, batch)
    return grads(loss, ctx.params), {"loss": loss.item()}


def vaccine_perturbation(model, batch, layers, rho: float) -> tuple[dict, torch.Tensor]:
    """Vaccine's worst-case perturbation of the attention outputs: e_i = rho·g_i/‖g‖ with
    g_i = dL/d(attention output of layer i) and ‖g‖ the norm over all the given layers together.

    git-disl/Vaccine trainer.py hooks the `LlamaAttention` modules (a backward hook to read the
    gradient of their output, a forward hook to add e_i to it): the attention output before the
    residual add, not the decoder layer's output. We perturb the same tensor."""
    g, loss = attention_grads(model, batch, layers)
    scale = rho / (global_norm(g) + 1e-7)  # the reference's 1e-7
    return {i: (gi * scale).detach() for i, gi in zip(layers, g)}, loss


def vaccine_step(ctx: Context, batch):
    """Vaccine (Huang et al. 2024): pass 1 finds the perturbation, pass 2 takes the gradient of
    the loss under it (added as a constant); pass 1's parameter gradient is not used."""
    layers = list(range(len(ctx.model.layers)))
    e, clean = vaccine_perturbation(ctx.model, batch, layers, ctx.cfg.rho)
    with add_to_attention(ctx.model, e):
        loss = batch_loss(ctx.model, batch)
    return grads(loss, ctx.params), {"loss": clean.item(), "perturbed_loss": loss.item()}


def mmd(x: torch.Tensor, y: torch.Tensor, kernels: int = 5, mul: float = 2.0) -> torch.Tensor:
    """Biased estimate of MMD² between samples x and y (n, d), with a sum of Gaussian RBF kernels
    exp(-‖a−b‖²/σ_k), σ_k = σ·mul^(k − kernels//2), σ the mean pairwise squared distance (held
    constant): `MMD_loss` of domenicrosati/representation-noising loss.py."""
    with torch.autocast(x.device.type, enabled=False):  # distances in float32
        z = torch.cat([x, y]).float()
        sq = z.pow(2).sum(1)
        d2 = (sq[:, None] + sq[None] - 2 * z @ z.T).clamp_min(0)
        n, m = len(z), len(x)
        sigma = d2.detach().sum() / (n * n - n) / mul ** (kernels // 2)
        k = sum(torch.exp(-d2 / (sigma * mul ** i)) for i in range(kernels))
        return (k[:m, :m] + k[m:, m:] - k[:m, m:] - k[m:, :m]).mean()


def lens_layers(n_layers: int, count: int) -> list[int]:
    """The layers whose logit lens RepNoise ascends: every one (count 0, as the reference), or
    `count` of them spread evenly over the depth, the last (the model's own output) always among them."""
    if count <= 0 or count >= n_layers:
        return list(range(n_layers))
    return [round((i + 1) * n_layers / count) - 1 for i in range(count)]


def repnoise_step(ctx: Context, batch):
    """RepNoise (Rosati et al. 2024), following representation_noising/loss.py `rep_noise_loss`:

        loss = L_refusal(batch) + beta·MMD(harmful MLP outputs, noise) − alpha·log(1 + L_lens)

    `batch` is alignment data (refusals); `ctx.next_harmful()` the harmful batch. MMD: for each
    layer, the MLP output on the harmful batch with non-answer positions zeroed, one flattened
    vector per sample, against Gaussian noise zeroed the same way; averaged over layers (the
    reference masks the positions where the harmful and paired refusal ids differ, i.e. the answer;
    we use the response tokens). L_lens: the harmful loss through the logit lens (final norm + LM
    head) of every layer's output, averaged; the last layer's lens is the model's own output.
    The reference also counts the embedding output and the final logits once more (a mean over
    L + 2 terms divided by L + 1); we average the L layers, or with `repnoise_lens_layers` the
    `lens_layers` only: each lens is a (tokens x vocab) head product forward and again in backward,
    most of a step's cost on a small model with a large vocabulary (docs/DESIGN.md)."""
    model, cfg = ctx.model, ctx.cfg
    harmful = ctx.next_harmful()
    labels, n = harmful["labels"], len(model.layers)
    mlp_out, layer_out = {}, {}
    with hooks([layer.mlp for layer in model.layers], lambda i, out: mlp_out.__setitem__(i, out)), \
            hooks(model.layers, lambda i, out: layer_out.__setitem__(i, out)):
        model.hidden(harmful["input_ids"])
    lens = lambda h: token_mean(sample_losses(h, labels, model.head), labels)  # the head at the answer positions only
    # each lens's (N, vocab) logits are recomputed in backward instead of kept: memory of one
    harmful_loss = torch.stack([checkpoint(lens, layer_out[i], use_reentrant=False)
                                for i in lens_layers(n, cfg.repnoise_lens_layers)]).mean()
    answer = (labels != IGNORE)[..., None].float()
    noise_mmd = torch.stack([mmd((mlp_out[i].float() * answer).flatten(1),
                                 (torch.randn_like(mlp_out[i], dtype=torch.float32) * answer).flatten(1))
                             for i in range(n)]).mean()
    refusal = batch_loss(model, batch)
    total = refusal + cfg.repnoise_beta * noise_mmd - cfg.repnoise_alpha * torch.log1p(harmful_loss)
    return grads(total, ctx.params), {"loss": refusal.item(), "mmd": noise_mmd.item(),
                                      "harmful_loss": harmful_loss.item(), "total_loss": total.item()}


def booster_step(ctx: Context, batch):
    """Booster (Huang et al. 2024), as git-disl/Booster trainer.py `BoosterAlignmentTrainer`:

        g = ∇f(w) + lam·(∇h(w) − ∇h(w − alpha·∇h(w)/‖∇h(w)‖))

    f the alignment loss of `batch`, h the harmful loss of one harmful batch (the same batch for
    both h terms). Three passes: h at w, h after the simulated harmful step, f at w."""
    model, params, cfg = ctx.model, ctx.params, ctx.cfg
    harmful = ctx.next_harmful()
    h, gh, h_after, gh_after = simulated_harmful_step(lambda: batch_loss(model, harmful), params, cfg.booster_alpha)
    f = batch_loss(model, batch)
    gf = grads(f, params)
    g = [a + cfg.booster_lam * (b - c) for a, b, c in zip(gf, gh, gh_after)]
    return g, {"loss": f.item(), "harmful_loss": h.item(), "harmful_loss_after_step": h_after.item()}


TVACCINE_DEEP = 26  # above this many layers, T-Vaccine also runs layer i-1 of each sampled i uncheckpointed


def tvaccine_trained(ctx: Context, layers) -> list[bool]:
    """Which of ctx.params T-Vaccine trains while `layers` are sampled, as Lslland/T-Vaccine does.

    Its trainer.py `unfreeze_activate_layers` sets requires_grad=False on the attention LoRA of
    every layer but the sampled ones, and leaves the MLP LoRA trainable. Its patched models
    (models/modeling_llama_my_new.py `LlamaModel.forward`) run every layer outside
    `activate_layers` under reentrant activation checkpointing (torch 2.1's default), which gives
    no gradient to a layer whose input needs none: the MLP adapters below the lowest layer of
    `activate_layers` get none, those from it up train. `activate_layers` (trainer.py
    `training_step`) is the sampled layers, plus layer i-1 of each sampled i above 26 layers."""
    n, lowest = len(ctx.model.layers), min(layers)
    if n > TVACCINE_DEEP and lowest > 0:
        lowest -= 1
    names = {id(p): name for name, p in ctx.model.named_parameters()}
    if not any(".self_attn." in names[id(p)] for p in ctx.params):
        raise ValueError("tvaccine trains the attention LoRA of the sampled layers, but no trainable "
                         "parameter is in an attention module: add q_proj,k_proj,v_proj,o_proj to "
                         "the LoRA targets")
    trained = tuple(f"layers.{i}.self_attn." for i in layers) + tuple(f"layers.{i}.mlp." for i in range(lowest, n))
    return [names[id(p)].startswith(trained) for p in ctx.params]


def tvaccine_layers(ctx: Context) -> tuple[list[int], dict]:
    """T-Vaccine's layer choice, kept in ctx.state (a resumed run goes on with it).

    Every K steps: probabilities proportional to ‖∂h/∂(attention output of layer i)‖, h the harmful
    loss of one harmful batch (one extra pass). Every J steps: S layers drawn from them without
    replacement, with the torch RNG the loop checkpoints. Micro-batches of one step share both."""
    cfg, st, n = ctx.cfg, ctx.state, len(ctx.model.layers)
    stats = {}
    if "probs" not in st or (ctx.step % cfg.tvaccine_probe_every == 0 and st["probed_at"] != ctx.step):
        g, h = attention_grads(ctx.model, ctx.next_harmful(), range(n))
        norms = torch.stack([gi.float().norm() for gi in g]).clamp_min(1e-12).cpu()
        st["probs"], st["probed_at"] = norms / norms.sum(), ctx.step
        stats["harmful_loss"] = h.item()
    if "layers" not in st or (ctx.step % cfg.tvaccine_every == 0 and st["sampled_at"] != ctx.step):
        draw = torch.multinomial(st["probs"], min(cfg.tvaccine_layers, n), replacement=False)
        st["layers"], st["sampled_at"] = sorted(draw.tolist()), ctx.step
    return st["layers"], stats


def tvaccine_step(ctx: Context, batch):
    """T-Vaccine (Liu et al. 2025): Vaccine on S sampled layers, whose attention LoRA trains.

    As Lslland/T-Vaccine trainer.py `BaseTrainer.training_step`: the statistic is the gradient
    norm of the harmful loss w.r.t. each attention output (a batch of 1 harmful sample there; a
    harmful batch here); the perturbation's norm is taken over the sampled layers only
    (`after_first_step`); the trained adapters are those of `tvaccine_trained`, the others get
    None, so that they stay where they are until sampled again."""
    layers, stats = tvaccine_layers(ctx)
    e, clean = vaccine_perturbation(ctx.model, batch, layers, ctx.cfg.tvaccine_rho)
    with add_to_attention(ctx.model, e):
        loss = batch_loss(ctx.model, batch)
    trained = tvaccine_trained(ctx, layers)
    g = iter(grads(loss, [p for p, t in zip(ctx.params, trained) if t]))
    g = [next(g) if t else None for t in trained]
    return g, {"loss": clean.item(), "perturbed_loss": loss.item(), **stats}


# ----------------------------------------------------------------------------- BDS (tuning stage)

def to_weights(u: torch.Tensor, weighting: str) -> torch.Tensor:
    """Logits to weights of mean 1 at u = 0: len(u)·softmax(u) or 2·sigmoid(u)."""
    return len(u) * torch.softmax(u, dim=0) if weighting == "softmax" else 2 * torch.sigmoid(u)


class Scorer(nn.Module):
    """BDS's amortized scheduler: a 2-layer MLP from a sample's mean-pooled final hidden state to a
    logit; weights within a batch as in the reference's neural scheduler (B·softmax over the batch,
    or 2·sigmoid). Its output layer starts at zero, so every weight starts at 1."""

    def __init__(self, hidden_size: int, width: int = 64, weighting: str = "softmax"):
        super().__init__()
        self.config = dict(hidden_size=hidden_size, width=width, weighting=weighting)
        self.net = nn.Sequential(nn.LayerNorm(hidden_size, elementwise_affine=False),
                                 nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(-1)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        return to_weights(self(features), self.config["weighting"])


def save_scorer(scorer: Scorer, path):
    torch.save({"config": scorer.config, "state_dict": scorer.state_dict()}, path)


def load_scorer(path, device=None) -> Scorer:
    saved = torch.load(path, map_location=device or "cpu", weights_only=True)
    scorer = Scorer(**saved["config"]).to(device)
    scorer.load_state_dict(saved["state_dict"])
    return scorer


def pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of each row: (B, T, D) -> (B, D), float32."""
    m = mask[..., None].float()
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1)


@contextlib.contextmanager
def final_hidden(model, into: dict):
    """Keep the final-norm output (B, T, hidden) of the next forward, detached, in into["h"]."""
    with hooks(model.layers[-1:], lambda _, out: into.__setitem__("h", model.norm(out.detach()))):
        yield


@torch.no_grad()
def score_dataset(model, scorer: Scorer, batches) -> torch.Tensor:
    """Weights of a new data set from a trained scorer, no retraining: (N,) in row (`index`) order,
    normalised over the whole set (N·softmax, or 2·sigmoid)."""
    logits, rows = [], []
    dev = next(scorer.parameters()).device
    for batch in batches:
        feats = {}
        with final_hidden(model, feats):
            model(batch["input_ids"].to(dev))
        logits.append(scorer(pooled(feats["h"], batch["attention_mask"].to(dev))).cpu())
        rows.append(batch["index"].cpu())
    u = torch.cat(logits)[torch.argsort(torch.cat(rows))]
    return to_weights(u, scorer.config["weighting"])


BDS_BETAS = (0.9, 0.95)  # the scheduler's Adam in Egg-Hu/Bayesian-Data-Scheduler run/train_dbs.py `train`


def bds_setup(ctx: Context):
    """BDS's state, built on first use: per-sample weights (SampleWeights, with its own
    Adam), or the amortized scorer, its Adam and the last weight each row was given."""
    st, cfg = ctx.state, ctx.cfg
    if ctx.n_samples < 1:
        raise ValueError("BDS keeps a weight per training row: set Context.n_samples")
    if cfg.bds_weighting not in ("softmax", "sigmoid"):
        raise ValueError(f"--defense-bds-weighting {cfg.bds_weighting!r}: choose softmax or sigmoid")
    dev = ctx.model.embed_tokens.weight.device
    if cfg.bds_amortized and "scorer" not in st:
        st["scorer"] = Scorer(ctx.model.config.hidden_size, cfg.bds_scorer_width, cfg.bds_weighting).to(dev)
        st["scorer_opt"] = torch.optim.Adam(st["scorer"].parameters(), lr=cfg.bds_lr, betas=BDS_BETAS)
        st["seen"] = torch.full((ctx.n_samples,), float("nan"))
    elif not cfg.bds_amortized and "weights" not in st:
        st["weights"] = SampleWeights(ctx.n_samples, weighting=cfg.bds_weighting, lr=cfg.bds_lr, betas=BDS_BETAS,
                                      device=dev)


def bds_step(ctx: Context, batch):
    """BDS (Hu et al. 2025), tuning stage, as Egg-Hu/Bayesian-Data-Scheduler bds/trainer/dbs_trainer.py
    `fit` with its script's settings (upperlevel_weight −1, no prior, constant scheduler lr):

        model loss      L_safe(θ)·safe_weight + mean(w.detach()·ℓ_ft)     (the loop's optimizer)
        scheduler loss  mean(w·ℓ_ft.detach())                              (one Adam step here)

    `batch` is fine-tuning data (rows `index` of the set), `ctx.next_align()` alignment data; ℓ
    are per-sample token means and L_safe their mean over the alignment batch (its
    BatchCrossEntropyLoss, sequence_reduce="mean", then .mean(0)). Scalar scheduler: w = N·softmax(u)
    over all N rows, indexed by the batch, so the scheduler gradient reaches every logit (a row
    off the batch gets −p_j·mean(w·ℓ_ft)); Adam betas (0.9, 0.95). Harmful rows keep a high loss
    under a model held to refusals, so their weight falls. The reference's optional Bayesian terms
    (entropy, weight-ratio and Gaussian priors on the logits) are off in its script and not
    implemented. Amortized: its neural scheduler scores rows with a separate LM and is never
    stepped in dbs_trainer.py (the scheduler step is skipped for scheduler_name "neural", so it
    scores with the weights it was loaded with); ours reads the fine-tuned model's own final
    hidden state (detached) and, having no pretrained scorer to load, is trained online by the
    scheduler loss (untrained, it gives every row weight 1)."""
    bds_setup(ctx)
    model, cfg, st = ctx.model, ctx.cfg, ctx.state
    feats = {}
    with final_hidden(model, feats):  # the scorer's input, when amortized
        ft = losses(model, batch)
    safe = losses(model, ctx.next_align()).mean()
    if cfg.bds_amortized:
        w = st["scorer"].weights(pooled(feats["h"], batch["attention_mask"]))
    else:
        w = st["weights"].weights()[batch["index"]]
    g = grads(cfg.bds_safe_weight * safe + (w.detach() * ft).mean(), ctx.params)
    scheduler_loss = (w * ft.detach()).mean()
    if cfg.bds_amortized:
        st["scorer_opt"].zero_grad(set_to_none=True)
        scheduler_loss.backward()
        st["scorer_opt"].step()
        st["seen"][batch["index"].cpu()] = w.detach().float().cpu()
    else:
        st["weights"].step(scheduler_loss)
    return g, {"loss": ft.mean().item(), "safe_loss": safe.item(),
               "weighted_loss": (w.detach() * ft.detach()).mean().item(),
               "weight_min": w.min().item(), "weight_max": w.max().item()}


def bds_weights(ctx: Context) -> list[float | None]:
    """BDS's weight of each training row (amortized: the last weight each row was given, None if never seen)."""
    st = ctx.state
    w = st["seen"].tolist() if "scorer" in st else st["weights"].weights().detach().cpu().tolist()
    return [None if math.isnan(x) else x for x in w]


def weight_share(weights: list[float | None], rows: list[bool]) -> float | None:
    """The share of the weight mass on the marked rows (rows never weighted left out): BDS's
    defense at work is a share on the harmful rows well under their share of the data."""
    seen = [(w, r) for w, r in zip(weights, rows, strict=True) if w is not None]
    total = sum(w for w, _ in seen)
    return sum(w for w, r in seen if r) / total if total > 0 else None


def save_state(ctx: Context, out) -> list[float | None]:
    """BDS's result in `out`: bds_weights.json (bds_weights, returned) and, amortized, the scorer (bds_scorer.pt)."""
    out, weights = Path(out), bds_weights(ctx)
    if "scorer" in ctx.state:
        save_scorer(ctx.state["scorer"], out / "bds_scorer.pt")
    (out / "bds_weights.json").write_text(json.dumps(
        {"weighting": ctx.cfg.bds_weighting, "amortized": ctx.cfg.bds_amortized, "weights": weights}))
    return weights


STEPS = {"sft": sft_step, "vaccine": vaccine_step, "repnoise": repnoise_step, "booster": booster_step,
         "tvaccine": tvaccine_step, "bds": bds_step}

# the steps whose gradients compiled blocks (--align-compile) give as eager ones do (tests/test_defenses.py).
# The others hook tensors into the blocks' forward: Vaccine's perturbation loses its gradient there,
# RepNoise's hooks do not trace, and T-Vaccine recompiles for every sampled set of layers.
COMPILABLE = ("sft", "booster", "bds")

# forward+backward passes per step. repnoise: the harmful and the alignment batch, one joint
# backward (plus a logit-lens head per layer); tvaccine: plus one harmful pass every K steps
# (the probe); bds: the fine-tuning and the alignment batch.
PASSES = {"sft": 1, "vaccine": 2, "repnoise": 2, "booster": 3, "tvaccine": 2, "bds": 2}
