"""A LLaMA-family transformer written by hand, with LoRA and generation.

Read top to bottom: the config, the blocks (RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU), the model, LoRA with its per-sample gradient dot products, and batched generation with
a KV cache. Parameter names follow Hugging Face's `LlamaForCausalLM` (without the leading
`model.`), so checkpoints map one to one (hf.py reads and writes them). Beside this file, none
needed to read it: hf.py (HF and PEFT folders), tokenizer.py (text to ids), fast.py (speed paths).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM",
                 "LlamaForSequenceClassification")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style {"rope_type": "llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    num_labels: int | None = None  # a score head instead of the LM head (BeaverTails moderation)
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Gemma-2 (all off for the others): GeGLU, embeddings scaled by sqrt(hidden), RMSNorm weights
    # as offsets from 1, a norm after attention and after the MLP too, soft-capped attention and
    # final logits, attention scaled by query_pre_attn_scalar^-1/2, sliding-window layers
    hidden_act: str = "silu"
    gemma: bool = False
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: list | None = None  # "sliding_attention" | "full_attention" per layer
    extra: dict = field(default_factory=dict)  # other config.json keys, written back on save

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, hf: dict, path: str = "config.json") -> "ModelConfig":
        """Read an HF config.json dict; unsupported architectures or options are errors."""
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{path}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
        gemma = arch == "Gemma2ForCausalLM"
        act = (hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh") if gemma \
            else hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{path}: activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if hf.get("mlp_bias"):
            raise ValueError(f"{path}: mlp_bias=true is not supported")
        rope = hf.get("rope_parameters")  # transformers >= 5 keeps theta and scaling together
        if rope:
            hf = dict(hf, rope_theta=rope.get("rope_theta", 10000.0),
                      rope_scaling=None if rope.get("rope_type", "default") == "default" else rope)
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"{path}: rope_scaling type {scaling.get('rope_type')!r} is not "
                             "supported (only 'llama3')")
        known = {f for f in cls.__dataclass_fields__ if f not in ("architecture", "extra", "num_labels", "gemma",
                                                                  "hidden_act")}
        if not gemma:  # these keys mean something else (or nothing) outside Gemma-2
            known -= {"attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                      "sliding_window", "layer_types"}
        kw = {k: hf[k] for k in known if k in hf}
        kw.update(hidden_act=act, gemma=gemma)
        if gemma and kw.get("sliding_window") and not kw.get("layer_types"):  # Gemma-2: every other layer
            kw["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                 for i in range(hf["num_hidden_layers"])]
        kw["attention_bias"] = hf.get("attention_bias", arch == "Qwen2ForCausalLM")
        kw["tie_word_embeddings"] = hf.get("tie_word_embeddings", arch != "LlamaForSequenceClassification")
        if arch.endswith("ForSequenceClassification"):
            kw["num_labels"] = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
        extra = {k: v for k, v in hf.items() if k not in known and k != "rope_parameters"}
        return cls(architecture=arch, extra=extra, **kw)

    def to_hf(self) -> dict:
        hf = dict(self.extra)
        hf.update({k: getattr(self, k) for k in self.__dataclass_fields__
                   if k not in ("architecture", "extra", "num_labels", "gemma", "hidden_act")
                   and (self.gemma or getattr(self, k) is not None)})
        hf["architectures"] = [self.architecture]
        hf.setdefault("model_type", {"MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                                     "Gemma2ForCausalLM": "gemma2"}.get(self.architecture, "llama"))
        hf.setdefault("hidden_activation" if self.gemma else "hidden_act", self.hidden_act)
        if self.num_labels:
            hf["id2label"] = {str(i): hf.get("id2label", {}).get(str(i), f"LABEL_{i}")
                              for i in range(self.num_labels)}
        return hf


# ----------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    """x / rms(x) · weight; Gemma (`offset`) stores weight − 1 and multiplies before the cast."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight.to(x32.dtype))).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def softcap(x, cap: float | None):
    """cap · tanh(x / cap): Gemma-2 bounds attention scores and logits this way."""
    return x if cap is None else torch.tanh(x / cap) * cap


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/d), with Llama-3 frequency scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    if not cfg.rope_scaling:
        return inv_freq
    s = cfg.rope_scaling  # Llama 3.1: keep high frequencies, divide low ones by factor, blend between
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_len / lo, inv_freq / factor,
                       torch.where(wavelen < old_len / hi, inv_freq, scaled))


def rope_cos_sin(inv_freq, positions, dtype):
    """cos and sin tables (B, 1, T, head_dim) for integer positions (B, T), HF rotate_half layout."""
    angles = positions[..., None].float() * inv_freq  # (B, T, d/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values (gpt-fast style): written in place, never reallocated."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.k = torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start, k, v):
        """Write k, v at positions start.. and return the keys and values seen so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep(self, rows):
        """Keep only these batch rows (a bool mask or indices): finished generations leave."""
        self.k, self.v = self.k[rows], self.v[rows]


def attend(q, k, v, mask, scale, enable_gqa: bool):
    """Causal (or masked) scaled dot-product attention. A bf16 training pass on a CPU runs it in
    float32, around casts: the CPU kernel's bf16 backward is slower than its float32 one
    (bench/speed.py, the attention table)."""
    up = q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad)
    y = F.scaled_dot_product_attention(*(t.float() if up else t for t in (q, k, v)), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=enable_gqa, scale=scale)
    return y.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None  # None: 1/sqrt(hd)
        self.softcap = cfg.attn_logit_softcapping
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, start: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)
        if self.softcap is None:  # grouped-query attention: SDPA repeats each KV head for n_head / n_kv queries
            y = attend(q, k, v, mask, self.scale, enable_gqa=self.n_kv != self.n_head)
        else:  # soft-capped scores: SDPA has no such option, so the attention is written out
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
            scores = softcap(q @ k.transpose(-1, -2) * (self.scale or self.hd ** -0.5), self.softcap)
            if mask is None:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            scores = scores.masked_fill(~mask, float("-inf"))
            y = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (GeGLU for Gemma)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.gemma)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = norm()  # Llama: before the MLP; Gemma-2: after attention
        self.mlp = MLP(cfg)
        if cfg.gemma:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, cos, sin, mask=None, start: int = 0):
        if hasattr(self, "pre_feedforward_layernorm"):  # Gemma-2: a norm before and after each sublayer
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, start))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.gemma)
        if cfg.num_labels:
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)
        elif not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def head(self, h):
        """Final norm and output head: logits (or moderation scores) from hidden states."""
        h = self.norm(h)
        if self.config.num_labels:
            return self.score(h)
        tied = self.config.tie_word_embeddings and "lm_head" not in self._modules  # fast.pack_linears adds one
        logits = F.linear(h, self.embed_tokens.weight) if tied else self.lm_head(h)
        return softcap(logits, self.config.final_logit_softcapping)

    def forward(self, input_ids, attention_mask=None, start: int = 0):
        """Logits (B, T, vocab): the head over `hidden`, at every position."""
        return self.head(self.hidden(input_ids, attention_mask, start))

    def embed(self, input_ids):
        x = self.embed_tokens(input_ids)
        if self.config.gemma:  # Gemma scales the embeddings by sqrt(hidden), rounded to their dtype
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def hidden(self, input_ids, attention_mask=None, start=0, n_layers: int | None = None):
        """The last block's output (B, T, hidden), before the final norm: `head` makes logits of it
        where they are needed (the loss's positions, a prompt's last token), not at every position.
        `attention_mask` (B, S) marks real tokens among the S = start + T positions seen so far
        (left padding in generation); None means causal, no padding (training pads on the right,
        where padded positions are never attended by real ones). `n_layers`: run only the first
        n blocks (a probe that reads block n - 1 needs no more)."""
        x = self.embed(input_ids)
        positions, masks = self.positions_and_masks(input_ids, attention_mask, start)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer, mask in zip(self.layers[:n_layers], masks):
            x = layer(x, cos, sin, mask, start)
        return x

    def positions_and_masks(self, input_ids, attention_mask, start):
        """Rotary positions (B, T) of the new tokens, and each layer's attention mask over the keys
        (None: plain causal). `start` is an int, or a 0-d tensor where a step must have the same
        shapes at every position (fast.generate_static: the mask spans the whole cache)."""
        (B, T), dev = input_ids.shape, input_ids.device
        q = start + torch.arange(T, device=dev)  # the new tokens' places in the sequence
        if attention_mask is None:
            positions, S = q.expand(B, T), start + T
        else:  # left padding: a token's rotary position counts the real tokens before it
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).gather(1, q.expand(B, T))
            S = attention_mask.shape[1]
        q, k = q[:, None], torch.arange(S, device=dev)[None]
        mask = None if attention_mask is None and start == 0 else k <= q  # None: SDPA's causal kernel
        if attention_mask is not None:  # hide padding; a padded query sees itself (no NaN)
            mask = (mask & attention_mask[:, None, None, :].bool()) | (k == q)
        types = self.config.layer_types or ["full_attention"] * len(self.layers)
        if "sliding_attention" in types:  # Gemma-2: keys in (q − window, q]
            local = (k <= q) & (k > q - self.config.sliding_window)
            sliding = local if mask is None else mask & local
        return positions, [mask if t == "full_attention" else sliding for t in types]

    def setup_cache(self, batch: int, max_len: int, cache=KVCache):
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.cache = cache(batch, self.config.num_key_value_heads, max_len,
                                          self.config.head_dim, p.dtype, p.device)

    def keep_cache_rows(self, rows):
        for layer in self.layers:
            layer.self_attn.cache.keep(rows)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None


def default_device() -> torch.device:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


# ----------------------------------------------------------------------------- LoRA

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen, A Kaiming-initialised and B zero (Hu et al.)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT does
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.probe = None  # a SampleGradDots while one is open (see sample_grad_dots)

    def forward(self, x):
        y = self.base(x)
        # the float32 adapter runs in the activations' dtype: a cast of its r x (in + out) weights,
        # not of the (B, T, in) activations (bf16 frozen weights: bf16 in, bf16 out)
        x = self.dropout(x)
        u = F.linear(x, self.lora_A.weight.to(x.dtype))
        z = F.linear(u, self.lora_B.weight.to(u.dtype))
        if self.probe is not None and z.requires_grad:
            self.probe.watch(self, x, u, z)  # per-sample dot products in the backward pass
        return y + (z * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        return self.scale * self.lora_B.weight @ self.lora_A.weight


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16, targets=LORA_TARGETS,
             dropout: float = 0.0):
    """Freeze the model and wrap every targeted Linear (by attribute name) with a LoRA adapter.

    The adapter is kept in float32 (stable Adam over bf16 weights), like PEFT's default."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters: merge_lora(model) first")
    model.requires_grad_(False)
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)} (known: {', '.join(LORA_TARGETS)})")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
    model.lora_config = dict(r=rank, lora_alpha=alpha, target_modules=sorted(targets),
                             lora_dropout=dropout)
    return model


class SampleGradDots:
    """∇ℓ_bᵀg for every row b of a batch, from the ordinary backward pass ("ghost" dot products).

    For one adapter, u = A·x and z = B·u at each token t of row b; with δ_t = ∂L/∂z_t from the
    backward pass, row b's gradients are sums of outer products over its tokens:
        ∇_B ℓ_b = Σ_t δ_t u_tᵀ,    ∇_A ℓ_b = Σ_t (Bᵀδ_t) x_tᵀ
    so their dot product with a fixed direction (g_A, g_B) needs no per-sample gradient:
        ⟨∇_B ℓ_b, g_B⟩ = Σ_t (g_Bᵀδ_t)·u_t,    ⟨∇_A ℓ_b, g_A⟩ = Σ_t (Bᵀδ_t)·(g_A x_t)
    at O(T·r·(in + out)) a row, the cost of the adapter's own forward. `norms` also sums
    ‖∇ℓ_b‖²; for that the per-sample gradient of one adapter at a time is formed (r·(in + out)
    numbers a row, fewer than the T×T Gram matrix of the ghost norm when r < T) and dropped.

    Rows never mix in a causal LM, so with the loss L = Σ_b c_b·ℓ_b the value is c_b·∇ℓ_bᵀg:
    backpropagate the plain sum of the losses, or divide by the weights afterwards."""

    def __init__(self, direction: dict, norms: bool = False):
        self.direction, self.norms = direction, norms  # {parameter: g}; others count as 0
        self.dots = self.sq_norms = None

    def watch(self, lora: "LoRALinear", x, u, z):
        z.register_hook(lambda grad: self._add(lora, x, u, grad))

    @torch.no_grad()
    def _add(self, lora, x, u, delta):
        A, B = lora.lora_A.weight, lora.lora_B.weight
        dt = torch.promote_types(A.dtype, torch.float32)  # bf16 activations are summed in float32
        x, u, delta = x.to(dt), u.to(dt), delta.to(dt)
        du = delta @ B.to(dt)  # (b, t, r): ∂L/∂u_t = Bᵀδ_t
        dots = delta.new_zeros(delta.shape[0])
        g_A, g_B = self.direction.get(lora.lora_A.weight), self.direction.get(lora.lora_B.weight)
        if g_B is not None:
            dots += ((delta @ g_B.to(dt)) * u).flatten(1).sum(1)  # Σ_t (g_Bᵀδ_t)·u_t
        if g_A is not None:
            dots += (du * (x @ g_A.to(dt).T)).flatten(1).sum(1)  # Σ_t (Bᵀδ_t)·(g_A x_t)
        self.dots = dots if self.dots is None else self.dots + dots
        if self.norms:
            sq = torch.einsum("bto,btr->bor", delta, u).square().flatten(1).sum(1)  # ‖∇_B ℓ_b‖²
            sq += torch.einsum("btr,bti->bri", du, x).square().flatten(1).sum(1)  # ‖∇_A ℓ_b‖²
            self.sq_norms = sq if self.sq_norms is None else self.sq_norms + sq


@contextlib.contextmanager
def sample_grad_dots(model: nn.Module, params, direction, norms: bool = False):
    """Watch the adapters during the forward passes inside the block; the backward through that
    graph (inside or after the block) fills `.dots` (B,) and, with norms, `.sq_norms` (B,).

        with sample_grad_dots(model, params, g) as probe:
            losses = sample_losses(...)
        G = torch.autograd.grad(losses.sum(), params)
        probe.dots   # ∇ℓ_bᵀg for every row b, exact, from the same backward that gave G"""
    probe = SampleGradDots({p: d for p, d in zip(params, direction)}, norms)
    mods = lora_modules(model).values()
    for m in mods:
        m.probe = probe
    try:
        yield probe
    finally:
        for m in mods:
            m.probe = None


@torch.no_grad()
def merge_lora(model: nn.Module):
    """Fold every adapter into its base weight, W <- W + (alpha/r) B A, and unwrap it."""
    for lora in lora_modules(model).values():
        lora.base.weight += lora.delta().to(lora.base.weight.dtype)
    return remove_lora(model)


def remove_lora(model: nn.Module):
    """Unwrap every adapter without merging it: the model is the base model again."""
    for name, lora in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lora.base)
    model.lora_config = None
    return model


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature: float, top_p: float, generator=None):
    """Greedy when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set with mass >= top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_padded(prompts: list[list[int]], length: int, new_tokens: int, pad_id: int, device):
    """Prompt ids (B, length), padded on the left, and the attention mask (B, length + new_tokens)
    marking their real tokens; the decoder marks each new token as it comes."""
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), length + new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, device=device)
        mask[i, length - len(p):length] = True
    return ids, mask


@torch.no_grad()
def generate_ids(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                 pad_id: int, temperature=0.0, top_p=1.0, generator=None) -> list[list[int]]:
    """Batched decoding with left padding and a KV cache; a row that reaches eos leaves the batch
    (its cache rows are dropped), so a batch costs what its live rows need."""
    dev = model.embed_tokens.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids, mask = left_padded(prompts, L, max_new_tokens, pad_id, dev)
    model.setup_cache(B, L + max_new_tokens)
    out, rows = [[] for _ in prompts], list(range(B))  # rows: the prompt of each live batch row
    try:
        logits = model.head(model.hidden(ids, mask[:, :L])[:, -1])  # the prompt's last token only
        for t in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_p, generator)
            live = nxt != eos_id
            for i, tok in zip(rows, nxt.tolist()):
                if tok != eos_id:
                    out[i].append(tok)
            if t == max_new_tokens - 1 or not live.any():
                break
            if not live.all():  # drop the finished rows from the batch and the cache
                rows = [i for i, keep in zip(rows, live.tolist()) if keep]
                nxt, mask = nxt[live], mask[live]
                model.keep_cache_rows(live)
            mask[:, L + t] = True
            logits = model(nxt[:, None], mask[:, :L + t + 1], start=L + t)[:, -1]
    finally:
        model.clear_cache()
    return out


def generate(model: Transformer, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, raw: bool = False,
             inputs: list | None = None, progress: bool = False, seed: int | None = None,
             max_tokens: int = 4096, decode=generate_ids) -> list[str]:
    """Answers to user messages, put in the prompt format of `tokenizer` (a tokenizer.Tokenizer)
    unless raw=True.

    Prompts are sorted by length and cut into batches of at most `batch_size` rows and
    `max_tokens` padded prompt tokens, so a few long prompts do not pad a whole batch; answers
    come back in input order. `decode`: the batch decoder, generate_ids or another with its
    signature (fast.generate_compiled: a compiled static-shape step)."""
    from tqdm import tqdm
    inputs = inputs or [None] * len(prompts)
    enc = [tokenizer.encode(p, add_bos=tokenizer.add_bos) if raw else tokenizer.encode_prompt(p, i)
           for p, i in zip(prompts, inputs)]
    batches, order = [], sorted(range(len(enc)), key=lambda i: len(enc[i]))
    for i in order:  # sorted: the row joining a batch is its longest
        if not batches or len(batches[-1]) == batch_size or (len(batches[-1]) + 1) * len(enc[i]) > max_tokens:
            batches.append([])
        batches[-1].append(i)
    gen = torch.Generator(model.embed_tokens.weight.device).manual_seed(seed) if seed is not None else None
    answers = [None] * len(enc)
    was_training = model.training
    model.eval()
    for chunk in tqdm(batches, desc="generate", disable=not progress):
        outs = decode(model, [enc[i] for i in chunk], max_new_tokens, tokenizer.eos_id,
                      tokenizer.pad_id, temperature, top_p, gen)
        for i, o in zip(chunk, outs):
            answers[i] = tokenizer.decode(o)
    model.train(was_training)
    return answers
