"""Data parallelism with torch.distributed: `torchrun --nproc_per_node N train.py ...`.

Every process (rank) holds the whole model and the same LoRA; each takes a disjoint shard of
every batch (rows rank, rank + N, ...), computes its gradients with the defense's step, and the
ranks sum them, each weighted by its share of the batch's response tokens:

    g = sum_r (n_r / n) g_r,   n_r = response tokens of shard r,  n = sum_r n_r

which is the gradient of the token-mean loss over the whole batch (defenses.batch_loss), so N
processes take the same steps as one process on the same global batch. The auxiliary batches a
defense draws (harmful, alignment streams) are not sharded: every rank draws the same ones from
the same seeded stream, so terms computed on them are equal on every rank and the weighted sum
(the weights sum to 1) keeps them as they are. Exact for sft, booster and repnoise (whose
perturbations come from those streams); vaccine and tvaccine normalise a perturbation over the
rows of their own shard, and bds keeps per-sample weights of its own shard's rows, so those are
data parallel but not equal to one process. The first-order Pharmacist selector (the default)
scores each pool batch on one rank and sums the scores (pharmacist.first_order_select); the
other selectors run whole on every rank, alike.

With `--fsdp` the frozen weights are sharded as well (FSDP, `torch.distributed.fsdp.fully_shard`):
each rank keeps 1/N of every frozen tensor, a block's weights are gathered for its forward and
backward and freed after. The LoRA parameters are left out of FSDP, whole on every rank, so their
gradients go through `weighted_sum` as above and the steps are the same as without it. Align and
finetune shard; select keeps the whole model on every rank.

Only rank 0 writes files, logs and checkpoints; a checkpoint holds no rank-specific state, so a
run resumes with another process count. Communication is torch.distributed's: `all_reduce` and
`barrier`, over gloo on a CPU and NCCL on CUDA.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from data.batches import IGNORE


def init(device: torch.device) -> torch.device:
    """Join the process group when torchrun started several processes; the device of this rank
    (cuda:LOCAL_RANK on a GPU machine)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and checkpoints."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def responses(batch: dict[str, torch.Tensor]) -> int:
    """The batch's response tokens: the labels a loss is taken on."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def part(batch: dict[str, torch.Tensor], i: int, n: int) -> tuple[dict[str, torch.Tensor], float]:
    """Rows i, i + n, ... of a batch and their share of its response tokens. A part left without
    rows (a batch of fewer than n rows) is the first row with share 0."""
    mine = {k: v[i::n] for k, v in batch.items()}
    if len(mine["labels"]) == 0:
        return {k: v[:1] for k, v in batch.items()}, 0.0
    total = responses(batch)
    return mine, responses(mine) / total if total else 1.0 / n


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's rows of a batch (rank, rank + N, ...) and its share n_r / n of the batch's
    response tokens; (the batch, 1.0) with one process. Every rank holds the whole batch, so no
    collective is needed, and a rank left without rows computes on a row with share 0, so every
    rank runs the same collectives."""
    return (batch, 1.0) if world() == 1 else part(batch, rank(), world())


def total(x: float, device=None) -> float:
    """The sum of x over the ranks (device: where NCCL needs the tensor)."""
    if world() == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def weighted_sum(grads: list[torch.Tensor | None], share: float) -> list[torch.Tensor | None]:
    """sum_r share_r * grads_r over the ranks, the same list on every rank after the call; a None
    (a parameter the step keeps frozen, the same on every rank) stays None."""
    if world() == 1:
        return [g * share if share != 1 and g is not None else g for g in grads]
    present = [g for g in grads if g is not None]
    flat = torch.cat([g.reshape(-1).float() for g in present]) * share  # one collective per step
    dist.all_reduce(flat)
    out, i = [], 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[i:i + g.numel()].view_as(g).to(g.dtype))
        i += g.numel()
    return out


def summed(x: np.ndarray, device=None) -> np.ndarray:
    """The element-wise sum of an array over the ranks (rows scored on one rank, 0 elsewhere)."""
    if world() == 1:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def weighted_stats(stats: dict, share: float, device=None) -> dict:
    """A step's float stats as the share-weighted sum over the ranks (the batch's token-mean
    loss for `loss`); other entries as this rank has them."""
    if world() == 1:
        return stats
    return {k: total(v * share, device) if isinstance(v, float) else v for k, v in sorted(stats.items())}


def shard_weights(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP over the frozen weights: each Block a unit (gathered for its own forward and backward),
    the root holding the embeddings, final norm and head; trainable (LoRA) parameters ignored."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (world(),))
    trained = lambda m: {p for p in m.parameters() if p.requires_grad}
    for block in model.layers:
        fully_shard(block, mesh=mesh, ignored_params=trained(block))
    fully_shard(model, mesh=mesh, ignored_params=trained(model))
    for method in ("hidden", "head"):  # the training losses call these, not forward
        register_fsdp_forward_method(model, method)


def gather_weights(model: torch.nn.Module) -> None:
    """Every sharded weight whole again on every rank (one all-gather per tensor; every rank calls),
    so adapters can be merged into them and the model saved. For saving only: FSDP's hooks stay."""
    from torch.distributed.tensor import DTensor
    whole = {}  # tied weights (one tensor under two names) gathered once
    for module in model.modules():
        for name, p in module._parameters.items():
            if isinstance(p, DTensor):
                if id(p) not in whole:
                    whole[id(p)] = torch.nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                module._parameters[name] = whole[id(p)]


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen weights this rank holds (1/N of them under FSDP)."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    return sum(local(p).numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
