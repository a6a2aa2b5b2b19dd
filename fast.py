"""The speed paths, kept apart from the model (as gpt-fast keeps its tricks apart from its model).

How to run the model fast, not what it is: whether bf16 pays on this device (`train_dtype`),
inductor-compiled blocks for training (`compile_blocks`), bf16 weights packed once into oneDNN's
blocked layout for inference on a CPU (`pack_linears`), and a decoder with static shapes whose
step compiles once per batch shape (`generate_static`). model.py is read without this file; this
file reads model.py.
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn

import model as M

# ----------------------------------------------------------------------------- bf16

def bf16_supported(device) -> bool:
    """Does bf16 arithmetic pay on this device? On CUDA, where the GPU supports it. On a CPU, only
    where it has bf16 matrix units (AVX-512 bf16, AMX), which no flag reliably tells (oneDNN
    reports bf16 support on plain AVX-512, where it emulates bf16 far slower than fp32): so a
    bf16 and an fp32 matmul are timed once per process and bf16 must win."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_bf16_faster()


@functools.cache
def _cpu_bf16_faster(n: int = 512, reps: int = 5) -> bool:
    a, b = torch.randn(n, n), torch.randn(n, n)

    def best(x, y):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)
    return best(a.bfloat16(), b.bfloat16()) < best(a, b)


def train_dtype(device, bf16: bool = True) -> torch.dtype:
    """The dtype of the frozen weights (and so of the activations) in select, align and finetune:
    bf16 where asked and the device has bf16 units, float32 elsewhere. The LoRA adapters and their
    optimizer state stay float32 (model.LoRALinear); losses and norms are taken in float32."""
    return torch.bfloat16 if bf16 and bf16_supported(device) else torch.float32


# ----------------------------------------------------------------------------- compiled blocks

def compile_blocks(model: M.Transformer) -> M.Transformer:
    """torch.compile each Block in place, for training: inductor fuses the elementwise work between
    the matrix products (RMSNorm, RoPE, SwiGLU, LoRA's scaling and casts) in the forward and the
    backward pass. All blocks share one graph with the batch and the length symbolic, so it compiles
    once for every batch shape (inductor's on-disk cache keeps it between processes). Hooks that
    add tensors to a block's forward lose their gradients here (defenses.COMPILABLE)."""
    for layer in model.layers:
        layer.compile(dynamic=True)
    return model


# ----------------------------------------------------------------------------- packed weights

class PackedLinear(nn.Module):
    """A frozen bf16 linear layer for inference on a CPU, its weight reordered once into oneDNN's
    blocked layout. A plain bf16 F.linear reorders the whole weight on every call, which at the
    few rows of a decode step costs about as much as the product itself (bench/speed.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)  # rows: a size hint
        self.bias = bias

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: nn.Module) -> bool:
    w = model.embed_tokens.weight
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


@torch.no_grad()
def pack_linears(model: M.Transformer, rows: int = 16) -> M.Transformer:
    """Every nn.Linear of a bf16 model on a CPU, and a tied output head, as a PackedLinear, in
    place, for inference only (packed weights neither train nor save); a no-op where `can_pack`
    is false. `rows`: the rows a call usually has (a decode step's batch)."""
    if M.lora_modules(model):
        raise ValueError("pack_linears: merge the LoRA adapters first (merge_lora)")
    if not can_pack(model):
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child.weight, child.bias, rows))
    if model.config.tie_word_embeddings and not model.config.num_labels:
        model.lm_head = PackedLinear(model.embed_tokens.weight, None, rows)  # model.head uses it
    return model


# ----------------------------------------------------------------------------- static-shape decoding

class StaticKVCache(M.KVCache):
    """A KV cache whose decode step writes at a tensor position and attends over the whole cache,
    so the step has the same shapes, and the same compiled graph, at every position."""

    def update(self, start, k, v):
        if not isinstance(start, torch.Tensor):  # the prompt: as the plain cache does
            return super().update(start, k, v)
        self.k.index_copy_(2, start.view(1), k)
        self.v.index_copy_(2, start.view(1), v)
        return self.k, self.v


def static_cache(model: M.Transformer, batch: int, max_len: int):
    """Attach the KV caches of this shape, the same objects on every call (made on first use and
    kept on the model): a compiled step checks it is given the caches it was compiled with."""
    caches = model.__dict__.setdefault("_static_caches", {})
    if (batch, max_len) not in caches:
        model.setup_cache(batch, max_len, StaticKVCache)
        caches[batch, max_len] = [layer.self_attn.cache for layer in model.layers]
    for layer, cache in zip(model.layers, caches[batch, max_len]):
        layer.self_attn.cache = cache


def compiled_forward(model: M.Transformer):
    """The model's forward compiled by inductor with its weights frozen as constants (on a CPU
    they are laid out for oneDNN, as pack_linears does; freezing is inductor's global switch, set
    here); made once per model, recompiled per batch shape."""
    if not hasattr(model, "_compiled_forward"):
        import torch._inductor.config
        torch._inductor.config.freezing = True
        model._compiled_forward = torch.compile(model.forward, dynamic=False)
    return model._compiled_forward


@torch.no_grad()
def generate_static(model: M.Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                    pad_id: int, temperature=0.0, top_p=1.0, generator=None, compile: bool = False,
                    bucket: int = 32) -> list[list[int]]:
    """model.generate_ids with static shapes: the batch keeps its finished rows, every step attends
    over the whole cache (its position a tensor, the mask as long as the cache), and the prompt
    length is padded up to a multiple of `bucket`, so a compiled step (compile=True) serves every
    batch of the same size."""
    dev = model.embed_tokens.weight.device
    B, L = len(prompts), -(-max(len(p) for p in prompts) // bucket) * bucket
    ids, mask = M.left_padded(prompts, L, max_new_tokens, pad_id, dev)
    step = compiled_forward(model) if compile else model
    static_cache(model, B, L + max_new_tokens)
    out, done = [[] for _ in prompts], torch.zeros(B, dtype=torch.bool, device=dev)
    try:
        logits = model.head(model.hidden(ids, mask[:, :L])[:, -1])
        for t in range(max_new_tokens):
            nxt = M.sample_next(logits.float(), temperature, top_p, generator)
            done |= nxt == eos_id
            for i, (tok, d) in enumerate(zip(nxt.tolist(), done.tolist())):
                if not d:
                    out[i].append(tok)
            if t == max_new_tokens - 1 or done.all():
                break
            mask[:, L + t] = True
            logits = step(nxt[:, None], mask, torch.tensor(L + t, device=dev))[:, -1]
    finally:
        model.clear_cache()
    return out


# for model.generate(..., decode=fast.generate_compiled): a compile per batch shape, then faster steps
generate_compiled = functools.partial(generate_static, compile=True)
