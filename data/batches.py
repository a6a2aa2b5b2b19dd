"""From samples to training batches, and the per-sample loss every stage uses.

    examples = encode_samples(samples, tokenizer, max_len=256)
    batches = Batches(examples, batch_size=8, pad_id=tokenizer.pad_id, seed=0)
    for step, batch in enumerate(batches.epoch(e)):     # a resumed run skips the first steps
        h = model.hidden(batch["input_ids"])
        losses = sample_losses(h, batch["labels"], model.head)  # (B,), weighted by Pharmacist and BDS

The tokenizer (tokenizer.py) formats a sample with the model's prompt format and returns the ids and
how many of them belong to the prompt. Loss is taken on the response and its end-of-sequence
token only: `labels` is -100 on the prompt and on padding. Labels are not shifted; the loss
shifts (logits at t predict the token at t + 1).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions without loss (prompt, padding)


def truncate(ids: list[int], n_prompt: int, max_len: int) -> tuple[list[int], int]:
    """Fit one example into max_len tokens and keep part of its response.

    The response keeps all the room the prompt leaves, and at least max_len // 2 tokens (all of
    it when shorter). The prompt loses tokens from its start (its end, next to the answer,
    holds the chat template's assistant header); the response loses tokens from its end.
    """
    if len(ids) <= max_len:
        return ids, n_prompt
    n_response = len(ids) - n_prompt
    keep_response = min(n_response, max(max_len - n_prompt, max_len // 2))
    keep_prompt = max_len - keep_response
    return ids[n_prompt - keep_prompt:n_prompt + keep_response], keep_prompt


def encode_samples(samples, tokenizer, max_len: int) -> list[dict]:
    """Token ids of each sample (prompt format + response + eos), truncated to max_len.

    Returns dicts {'input_ids': list[int], 'n_prompt': int, 'index': position in `samples`}.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (a prompt and a response token), got {max_len}")
    examples = []
    for i, s in enumerate(samples):
        ids, n_prompt = tokenizer.encode_example(s.prompt, s.response, s.input)
        if not 0 < n_prompt < len(ids):
            raise ValueError(f"sample {s.id}: the tokenizer gave {n_prompt} prompt tokens out of "
                             f"{len(ids)}; a sample needs a prompt and a non-empty response")
        ids, n_prompt = truncate(list(ids), n_prompt, max_len)
        examples.append({"input_ids": ids, "n_prompt": n_prompt, "index": i})
    return examples


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids and labels (B, T) long, attention_mask (B, T) bool,
    index (B,) long (row positions, to look up per-sample weights)."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids, n = torch.tensor(e["input_ids"], dtype=torch.long), len(e["input_ids"])
        input_ids[row, :n] = ids
        labels[row, e["n_prompt"]:n] = ids[e["n_prompt"]:]  # loss on the response and eos only
        attention_mask[row, :n] = True
    index = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "index": index}


class Batches:
    """Length-bucketed batches, a new deterministic order each epoch.

    With shuffle: permute the examples (seeded by seed and epoch), sort each chunk of
    `chunk * batch_size` examples by length so a batch holds similar lengths (little padding),
    cut the chunks into batches, and shuffle the batches. Without shuffle: consecutive batches
    in the given order. Every example is in exactly one batch of an epoch; the last batch of a
    chunk may be smaller.
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, shuffle: bool = True,
                 seed: int = 0, chunk: int = 50):
        if not examples:
            raise ValueError("Batches: no examples (empty set); check the data file")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.shuffle, self.seed, self.chunk = shuffle, seed, chunk

    def plan(self, epoch: int) -> list[list[int]]:
        """Positions (into `examples`) of the examples of each batch of this epoch."""
        order, bs = list(range(len(self.examples))), self.batch_size
        if not self.shuffle:
            return [order[i:i + bs] for i in range(0, len(order), bs)]
        rng = random.Random(f"{self.seed}:{epoch}")
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.chunk * bs):
            part = sorted(order[start:start + self.chunk * bs],
                          key=lambda i: len(self.examples[i]["input_ids"]))
            batches += [part[i:i + bs] for i in range(0, len(part), bs)]
        rng.shuffle(batches)
        return batches

    def epoch(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        """The collated batches of one epoch, as a list (resume at step s: `epoch(e)[s:]`)."""
        return [collate([self.examples[i] for i in b], self.pad_id) for b in self.plan(epoch)]

    def __len__(self) -> int:
        """Batches per epoch (with shuffle, each chunk ends with its own partial batch)."""
        if not self.shuffle:
            return math.ceil(len(self.examples) / self.batch_size)
        full_chunks, rest = divmod(len(self.examples), self.chunk * self.batch_size)
        return full_chunks * self.chunk + math.ceil(rest / self.batch_size)

def sample_losses(h: torch.Tensor, labels: torch.Tensor, head=None) -> torch.Tensor:
    """Per-sample loss (B,): token mean of the cross entropy over the response tokens, in float32
    (float64 for a float64 model).

    `h` are logits (B, T, vocab), or hidden states with `head` their output head: the head then
    runs only where a response token is predicted, so prompt and padding positions never reach the
    vocabulary-wide matmul, and it runs a block of rows at a time (`head_cross_entropy`). Position t
    predicts the label at t + 1. A row without response tokens gets 0.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE  # (B, T-1)
    h = h[:, :-1][keep]  # (N, D): the positions that predict a response token
    if head is None:
        token_loss = F.cross_entropy(h.to(torch.promote_types(h.dtype, torch.float32)), targets[keep],
                                     reduction="none")
    else:
        token_loss = head_cross_entropy(h, targets[keep], head)
    total = token_loss.new_zeros(len(labels)).index_add(0, keep.nonzero()[:, 0], token_loss)
    return total / keep.sum(dim=1).clamp(min=1)


HEAD_ROWS = 256  # rows per block of the vocabulary-wide head matmul (256 x 49k logits: 50 MB in float32)
SOFTMAX_ROWS = 32  # rows per softmax piece on a CPU: 32 x 49k float32 logits stay in a 2 MB L2 cache


def head_cross_entropy(h: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    """Token losses (N,) of head(h) (N, vocab) against targets (N,), in float32, without keeping
    the vocabulary-wide logits: `HeadCrossEntropy` where only h needs a gradient, plain
    autograd where the head itself trains (its parameters need theirs)."""
    if len(h) and head(h[:1].detach()).requires_grad:  # the head's own parameters train: plain autograd
        return F.cross_entropy(head(h).to(torch.promote_types(h.dtype, torch.float32)), targets, reduction="none")
    if h.requires_grad and torch.is_grad_enabled():
        return HeadCrossEntropy.apply(h, targets, head)
    return head_blocks(h.detach(), targets, head, grad=False)[0]  # no backward: the losses alone


def head_blocks(h: torch.Tensor, targets: torch.Tensor, head, grad: bool):
    """Losses (N,) of head(h) and, with grad, d loss / d h (N, D), a block of HEAD_ROWS rows at a
    time: each block's logits are formed, used and dropped."""
    dt = torch.promote_types(h.dtype, torch.float32)
    losses, dh = h.new_empty(len(h), dtype=dt), torch.empty_like(h) if grad else None
    for i in range(0, len(h), HEAD_ROWS):
        hc = h[i:i + HEAD_ROWS].detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            logits = head(hc)
        losses[i:i + HEAD_ROWS], g = softmax_cross_entropy(logits.detach(), targets[i:i + HEAD_ROWS], dt, grad)
        if grad:
            dh[i:i + HEAD_ROWS] = torch.autograd.grad(logits, hc, g)[0]  # softmax − one-hot, back through the head
    return losses, dh


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, dt=torch.float32, grad: bool = False):
    """(loss, d loss / d logits) of each row: −log softmax at the target, and softmax − one-hot
    (in float32, then the logits' dtype); on a CPU in pieces that stay in the cache."""
    loss = logits.new_empty(len(logits), dtype=dt)
    g = torch.empty_like(logits) if grad else None
    step = SOFTMAX_ROWS if logits.device.type == "cpu" else max(1, len(logits))
    for i in range(0, len(logits), step):
        t = targets[i:i + step]
        rows = torch.arange(len(t), device=logits.device)
        logp = F.log_softmax(logits[i:i + step], -1, dtype=dt)
        loss[i:i + step] = -logp[rows, t]
        if grad:
            p = logp.exp_()
            p[rows, t] -= 1
            g[i:i + step] = p
    return loss, g


class HeadCrossEntropy(torch.autograd.Function):
    """Cross entropy through a frozen output head, a block of `HEAD_ROWS` rows at a time: each
    block's logits are formed, turned into losses and d loss / d h (softmax − one-hot, back
    through the head) and dropped, so memory holds (N, D) gradients instead of (N, vocab) logits
    and the softmax runs on cache-sized pieces. The backward pass is one multiply."""

    @staticmethod
    def forward(ctx, h, targets, head):
        losses, dh = head_blocks(h, targets, head, grad=True)
        ctx.save_for_backward(dh)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad, = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None


class Stream:
    """Endless batches of one set, epoch after epoch, moved to a device: the auxiliary data a
    step draws from (harmful, validation, alignment). `drawn` is its position; a resumed run
    that restores it draws the same batches."""

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int = 0, device=None):
        self.batches = Batches(examples, batch_size, pad_id, shuffle=True, seed=seed)
        self.per_epoch, self.drawn, self.device = len(self.batches), 0, device
        self._plan = (None, None)  # (epoch, its plan), computed once per epoch

    def __call__(self) -> dict[str, torch.Tensor]:
        epoch, i = divmod(self.drawn, self.per_epoch)
        if self._plan[0] != epoch:
            self._plan = (epoch, self.batches.plan(epoch))
        self.drawn += 1
        batch = collate([self.batches.examples[j] for j in self._plan[1][i]], self.batches.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}


def token_mean(per_sample: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over all response tokens of a batch from its per-sample (token-mean) losses: what
    the HF Trainer's loss is, where a long answer weighs by its length."""
    n = (labels[:, 1:] != IGNORE).sum(1)
    return (per_sample * n).sum() / n.sum().clamp(min=1)
