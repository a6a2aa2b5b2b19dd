"""The pipeline's CLI and its one training loop.

    python train.py --stage select|align|finetune|eval|all --out DIR [--preset tiny|cpu|paper] [flags]

(1) select: Pharmacist (or a baseline) ranks the alignment pool and keeps a core subset;
(2) align: a LoRA trained on that subset with an alignment-stage defense, then merged;
(3) finetune: the harmful fine-tuning attack (task data + a fraction p of harmful samples) on a
    new LoRA, optionally defended by BDS; (eval) harmful score, over-refusal, task accuracy.
Each stage reads the previous stage's folder inside --out and writes its own, with
`metrics.jsonl` and `summary.json`; a finished stage is skipped unless --force.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import default_weights
import defenses
import evaluate
import fast
import hf
import model as M
import parallel as P
import pharmacist
from data.batches import Batches, Stream, collate, encode_samples
from data.samples import Sample, load_jsonl, save_jsonl
from data.prepare import round_half_up
import files
from files import Checkpoint, content_hash, finite, read_json, remove, restore_swapped, write_json, write_text_atomic
from flags import Parser, add_flags

ROOT = Path(__file__).resolve().parent
STAGES = ("select", "align", "finetune", "eval")


# ----------------------------------------------------------------------------- configs

@dataclass
class TrainConfig:
    """One LoRA training run (the align stage and the finetune stage each have one)."""
    defense: str = "sft"  # align: sft|vaccine|repnoise|booster|tvaccine; finetune: sft|bds
    epochs: int = 1  # passes over the data
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay (never on norms and biases)
    warmup: float = 0.1  # fraction of the steps with a linear warmup, then cosine decay
    clip: float = 1.0  # gradient-norm clipping
    max_len: int = 128  # tokens per sample (prompt truncated first)
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float = 16.0  # LoRA scale alpha (the update is alpha/r * B A)
    lora_targets: str = ",".join(M.LORA_TARGETS)  # comma list of projections that get an adapter
    bf16: bool = True  # bf16 frozen weights where the device has bf16 units (fast.train_dtype); fp32 elsewhere
    save_every: int = 50  # checkpoint every this many optimizer steps
    seed: int = 0  # data order, LoRA init, dropout
    retain: str = ""  # a file of the data folder trained on beside the stage's own rows ('' = none)
    compile: bool = False  # torch.compile the blocks (fast.compile_blocks): ~40 s once, then faster steps


@dataclass
class AttackData:
    """What the attack trains on (built by data/prepare.py)."""
    task: str = "sst2"  # sst2|agnews|gsm8k: reads attack_{task}.jsonl from the data folder
    p: float = -1.0  # harmful share of the attack's n rows (-1: attack_{task}.jsonl's own; see attack_rows)


@dataclass
class Config:
    stage: str = "select"  # select|align|finetune|eval|all
    out: str = "runs/default"  # the run folder: one sub-folder per stage
    preset: str = "cpu"  # tiny|cpu|paper: tested sizes, any flag overrides them
    model: str = "smollm2-135m-instruct"  # HF folder or built-in name (tiny-random)
    data: str = ""  # folder from data/prepare.py ('' = the embedded default, data/default)
    device: str = ""  # cuda|mps|cpu ('' = the best available)
    resume: bool = False  # continue an interrupted stage from its checkpoint
    force: bool = False  # redo stages that already finished
    fsdp: bool = False  # under torchrun: shard the frozen weights over the processes in align and finetune (parallel.py)
    select: pharmacist.SelectConfig = field(default_factory=pharmacist.SelectConfig)
    align: TrainConfig = field(default_factory=lambda: TrainConfig(retain="retain.jsonl"))  # benign rows, see stage_align
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(defense="sft", lr=2e-4))
    attack: AttackData = field(default_factory=AttackData)
    defense: defenses.DefenseConfig = field(default_factory=defenses.DefenseConfig)
    eval: evaluate.EvalConfig = field(default_factory=evaluate.EvalConfig)


SECTIONS = {"select": "select-", "align": "align-", "finetune": "finetune-", "attack": "attack-",
            "defense": "defense-", "eval": "eval-"}  # flag prefix of each section: no flag is ambiguous

PRESETS = {
    "tiny": {"model": "tiny-random", "select.steps": 4, "select.batch_size": 4, "select.max_len": 64,
             "align.epochs": 1, "align.max_len": 64, "align.batch_size": 4,
             "finetune.epochs": 1, "finetune.max_len": 64, "finetune.batch_size": 4,
             "eval.max_new_tokens": 4, "eval.limit": 8, "eval.judge": "refusal",  # no SmolLM2 judge
             # fp32 throughout: the same numbers on every CPU, with or without bf16 units
             "select.bf16": False, "align.bf16": False, "finetune.bf16": False, "eval.bf16": False},
    "cpu": {},  # the dataclass defaults: SmolLM2-135M on a 2-core CPU
    "paper": {"select.lora_rank": 8, "select.lora_alpha": 4,  # Llama-2-7B on a GPU (the papers)
              "align.lora_rank": 8, "align.lora_alpha": 4, "align.lr": 1e-3, "align.epochs": 20,
              "align.batch_size": 10, "align.max_len": 256,
              "finetune.lora_rank": 8, "finetune.lora_alpha": 4, "finetune.lr": 1e-5,
              "finetune.epochs": 20, "finetune.batch_size": 10, "finetune.max_len": 256},
}


def build_parser(cfg: Config) -> argparse.ArgumentParser:
    """One flag per config field; --help shows them in one group per section."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p.add_argument_group("run"), cfg, skip=SECTIONS)
    for section, prefix in SECTIONS.items():  # every flag of a section carries its prefix
        sub = getattr(cfg, section)
        add_flags(p.add_argument_group(section, (type(sub).__doc__ or "").split("\n")[0]), sub, prefix, section + ".")
    return p


def parse_args(argv=None) -> Config:
    """Flags map 1:1 onto the config fields; a preset sets defaults, explicit flags win."""
    cfg = Config()
    p = build_parser(cfg)
    args = vars(p.parse_args(argv))
    preset = args.get("preset", cfg.preset)
    if preset not in PRESETS:
        p.error(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    for key, value in {**PRESETS[preset], **args}.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    problem = config_problem(cfg)
    if problem:
        p.error(problem)
    return cfg


def one_of(flag: str, value, choices) -> str | None:
    return None if value in choices else f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}"


def config_problem(cfg: Config) -> str | None:
    """The first flag whose value cannot work, as one line naming the flag and the fix; None if all
    can. Checked before any work starts, so a typo is not found hours into a run."""
    align_defenses = [k for k in defenses.STEPS if k != "bds"]
    checks = [data_problem(cfg), run_problem(cfg), one_of("--stage", cfg.stage, STAGES + ("all",)),
              one_of("--align-defense", cfg.align.defense, align_defenses),
              one_of("--finetune-defense", cfg.finetune.defense, ("sft", "bds")),
              one_of("--defense-bds-weighting", cfg.defense.bds_weighting, ("softmax", "sigmoid")),
              one_of("--select-selector", cfg.select.selector, pharmacist.SELECTORS),
              one_of("--select-mode", cfg.select.mode, pharmacist.MODES),
              one_of("--attack-task", cfg.attack.task, tuple(evaluate.TASKS)),
              one_of("--eval-judge", cfg.eval.judge, ("trained", *evaluate.CPU_JUDGES, "moderation")),
              one_of("--eval-classify", cfg.eval.classify, ("likelihood", "generate")),
              *[one_of("--eval-tasks", t, ("harmful", "harmful_qa", "benign", *evaluate.TASKS))
                for t in cfg.eval.tasks.split(",")]]
    if cfg.eval.judge == "moderation" and not cfg.eval.moderation_model:
        checks.append("--eval-judge moderation needs --eval-moderation-model DIR (a beaver-dam-7b HF folder)")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        checks.append("--fsdp shards the frozen weights over torchrun's processes: start with "
                      "`torchrun --nproc_per_node N train.py ...` (N >= 2), or leave --fsdp out")
    if cfg.device and cfg.device != "cpu" and not (cfg.device.startswith("cuda") and torch.cuda.is_available()
                                                     or cfg.device == "mps" and torch.backends.mps.is_available()):
        checks.append(f"--device {cfg.device}: not available on this machine (use cpu, or leave it out for the best one)")
    for name in ("outer_batch_size", "checkpoints", "batch_size", "passes", "max_len", "lora_rank",
                 "save_every"):
        if getattr(cfg.select, name) < 1:
            checks.append(f"--select-{name.replace('_', '-')} {getattr(cfg.select, name)}: must be at least 1")
    checks.append(keep_problem(cfg))
    for name in ("steps", "lora_layers"):
        if getattr(cfg.select, name) < 0:
            checks.append(f"--select-{name.replace('_', '-')} {getattr(cfg.select, name)}: must be >= 0")
    for name in ("inner_lr", "selector_lr", "outer_lr", "eta"):
        if not 0 < getattr(cfg.select, name) < math.inf:
            checks.append(f"--select-{name.replace('_', '-')} {getattr(cfg.select, name)}: must be a finite number > 0")
    if not 0 < cfg.select.outer_decay <= 1:
        checks.append(f"--select-outer-decay {cfg.select.outer_decay}: must be in (0, 1]")
    for section in ("align", "finetune"):
        t, flag = getattr(cfg, section), f"--{section}-"
        for name in ("epochs", "batch_size", "grad_accum", "lora_rank", "save_every", "max_len"):
            if getattr(t, name) < 1:
                checks.append(f"{flag}{name.replace('_', '-')} {getattr(t, name)}: must be at least 1")
        for name in ("lr", "clip"):
            if not 0 < getattr(t, name) < math.inf:
                checks.append(f"{flag}{name} {getattr(t, name)}: must be a finite number > 0")
        if t.max_len < 8:
            checks.append(f"{flag}max-len {t.max_len}: must be at least 8 (room for a prompt and an answer)")
        targets = [x.strip() for x in t.lora_targets.split(",")]
        if not all(x in M.LORA_TARGETS for x in targets):
            checks.append(f"{flag}lora-targets {t.lora_targets!r}: a comma list of {','.join(M.LORA_TARGETS)}")
        if t.max_steps < 0 or not 0 <= t.warmup < 1 or t.weight_decay < 0:
            checks.append(f"{flag}max-steps >= 0, {flag}warmup in [0, 1) and {flag}weight-decay >= 0, got "
                          f"{t.max_steps}, {t.warmup}, {t.weight_decay}")
        if t.compile and (t.defense not in defenses.COMPILABLE or cfg.fsdp):
            why = "--fsdp" if cfg.fsdp else f"{t.defense}, whose hooks a compiled block does not carry"
            checks.append(f"{flag}compile: not with {why} (it compiles {', '.join(defenses.COMPILABLE)} "
                          f"without --fsdp); leave {flag}compile out")
        if t.retain and not (data_dir(cfg) / t.retain).is_file() and cfg.stage in ("all", section):
            checks.append(f"{flag}retain {t.retain}: no such file in {data_dir(cfg)} (rebuild the data with "
                          f"data/prepare.py, or {flag}retain '' to train without it)")
    for f in dataclasses.fields(cfg.defense):  # every defense weight, size and rate: finite and >= 0
        value = getattr(cfg.defense, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
            checks.append(f"--defense-{f.name.replace('_', '-')} {value}: must be a finite number >= 0")
    for name in ("tvaccine_layers", "tvaccine_every", "tvaccine_probe_every", "bds_scorer_width"):
        if getattr(cfg.defense, name) < 1:
            checks.append(f"--defense-{name.replace('_', '-')} {getattr(cfg.defense, name)}: must be at least 1")
    if cfg.defense.bds_lr <= 0:
        checks.append(f"--defense-bds-lr {cfg.defense.bds_lr}: must be a finite number > 0")
    if cfg.attack.p != -1 and not 0 <= cfg.attack.p <= 1:
        checks.append(f"--attack-p {cfg.attack.p}: a share in [0, 1] (or -1 for the attack file's own)")
    elif cfg.attack.p != -1 and cfg.stage in ("all", "finetune") and (data_dir(cfg) / f"attack_{cfg.attack.task}.jsonl").is_file():
        try:
            attack_rows(cfg)  # enough harmful rows for this share
        except ValueError as e:
            checks.append(str(e))
    moderation = cfg.eval.moderation_model
    if moderation and not Path(moderation).is_dir() and not default_weights.HUB_ID.fullmatch(moderation):
        checks.append(f"--eval-moderation-model {moderation}: no such folder (an HF folder, or the Hub id "
                      "PKU-Alignment/beaver-dam-7b)")
    if cfg.eval.max_new_tokens < 1 or cfg.eval.batch_size < 1 or cfg.eval.limit < 0:
        checks.append(f"--eval-max-new-tokens and --eval-batch-size at least 1, --eval-limit >= 0 (0: all), got "
                      f"{cfg.eval.max_new_tokens}, {cfg.eval.batch_size}, {cfg.eval.limit}")
    return next((c for c in checks if c), None)


def keep_problem(cfg: Config) -> str | None:
    """--select-keep: a fraction in (0, 1] or a whole count no larger than the pool (any, for full)."""
    pool = data_dir(cfg) / "pool.jsonl"
    n = sum(1 for line in pool.read_text().splitlines() if line.strip()) if pool.is_file() else 10**12
    try:
        pharmacist.rows_kept(cfg.select, n)
    except ValueError as e:
        return str(e)
    return None


def data_problem(cfg: Config) -> str | None:
    """--data: a folder whose files are those its manifest lists (a build stopped midway or mixed
    with another has files that are not)."""
    if cfg.data:
        restore_swapped(Path(cfg.data))  # a rebuild killed mid-swap: the earlier build comes back
    if cfg.data and not Path(cfg.data).is_dir():
        return (f"--data {cfg.data}: no such folder (build it with data/prepare.py, or leave --data out "
                "for the embedded default set)")
    manifest = data_dir(cfg) / "manifest.json"
    listed = read_json(manifest).get("files", {}) if manifest.is_file() else {}
    bad = [name for name, h in listed.items() if content_hash(data_dir(cfg) / name) != h]
    if bad:
        return (f"--data {data_dir(cfg)}: {bad[0]} is not the file its manifest.json lists (a build stopped "
                "midway, or an edited file); rebuild the folder with data/prepare.py")
    return None


def run_problem(cfg: Config) -> str | None:
    """--out, --resume and --force."""
    if not cfg.out.strip():
        return "--out '': name the run folder (runs/NAME)"
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        return f"--out {cfg.out}: a file, not a folder; choose another --out"
    if cfg.resume and cfg.force:
        return "--resume --force: --resume continues a stage, --force starts it over; choose one"
    return None


# ----------------------------------------------------------------------------- run bookkeeping

def data_dir(cfg: Config) -> Path:
    return Path(cfg.data) if cfg.data else ROOT / "data" / "default"


def read_split(cfg: Config, name: str) -> list[Sample]:
    path = data_dir(cfg) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; build the data with "
                                f"`python data/prepare.py --source PUBLIC_DATA_DIR --out {data_dir(cfg)}` "
                                "(or leave --data out for the embedded default set)")
    return load_jsonl(path)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Clock:
    """Wall time of a stage; CUDA events on a GPU so queued kernels are counted."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        self.wall0 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            torch.cuda.synchronize()
            return self.t0.elapsed_time(t1) / 1000
        return time.perf_counter() - self.wall0

    def peak_memory_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- the training loop

def lr_lambda(total: int, warmup: float):
    """Linear warmup over the first `warmup` fraction of steps, then cosine decay to 0."""
    n_warm = max(1, int(total * warmup))
    return lambda s: (s + 1) / n_warm if s < n_warm else \
        0.5 * (1 + math.cos(math.pi * (s - n_warm) / max(1, total - n_warm)))


def make_optimizer(model, cfg: TrainConfig):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n)]
    fused = all(p.device.type in ("cpu", "cuda") for _, p in named)  # one kernel for all the adapters' updates
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=fused)


def json_line(record: dict) -> str:
    """One JSON line; a non-finite number is written as null (JSON has no NaN or Infinity)."""
    return json.dumps(finite(record)) + "\n"


def step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def keep_metrics(path: Path, step: int):
    """metrics.jsonl cut back to the rows of steps <= step (a resumed run writes the rest again)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if (step_of(line) or math.inf) <= step]
        write_text_atomic("".join(r + "\n" for r in rows), path)


def train(model, examples, pad_id: int, cfg: TrainConfig, ctx: defenses.Context, out: Path,
          streams: dict[str, "Stream"], resume: bool = False, owner: str = "") -> dict:
    """The one loop: a defense step gives gradients, the loop accumulates, clips and steps.

    A checkpoint (files.Checkpoint: weights, optimizer, scheduler, defense state, data positions,
    RNG) goes to out/checkpoint.pt every `save_every` steps, at the end, and on Ctrl-C or SIGTERM;
    a non-finite loss stops the run and leaves the last periodic checkpoint as it is. `owner` (the
    stage's fingerprint) goes into the checkpoint: --resume loads no other start's."""
    step_fn = defenses.STEPS[cfg.defense]
    device = model.embed_tokens.weight.device
    params = ctx.params
    batches = Batches(examples, cfg.batch_size, pad_id, shuffle=True, seed=cfg.seed)
    per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    total = per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, per_epoch * cfg.epochs)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup))
    main = P.is_main()  # with torchrun: rank 0 writes, every rank computes
    ckpt = Checkpoint(out / "checkpoint.pt", cfg.save_every, writes=main, owner=owner, params=params, optimizer=opt,
                      scheduler=sched, defense=ctx, **{f"stream_{k}": v for k, v in streams.items()})
    metrics_path, step, tokens, elapsed = out / "metrics.jsonl", 0, 0, 0.0
    if resume and ckpt.path.exists():
        step, counters = ckpt.load()
        tokens, elapsed = counters["tokens"], counters["elapsed"]
        if main:
            keep_metrics(metrics_path, step)
    elif main:
        if resume:
            print(f"no checkpoint in {out}: {out.name} starts from step 0", file=sys.stderr)
        metrics_path.unlink(missing_ok=True)
    clock = Clock(device)
    ckpt.mark(step, tokens=tokens, elapsed=elapsed)
    bar = tqdm(total=total, initial=step, desc=f"{out.name} [{cfg.defense}]", dynamic_ncols=True, disable=not main)
    stats = {}
    with ckpt.saved_on_interrupt():
        while step < total:
            epoch, pos = divmod(step, per_epoch)
            plan = batches.plan(epoch)[pos * cfg.grad_accum:(pos + 1) * cfg.grad_accum]
            chunk = [collate([examples[i] for i in b], pad_id) for b in plan]
            for p in params:
                p.grad = None
            for batch in chunk:
                tokens += int(batch["attention_mask"].sum())  # the whole batch's, on every rank
                batch, share = P.shard({k: v.to(device) for k, v in batch.items()})
                ctx.step = step
                grads, stats = step_fn(ctx, batch)
                grads, stats = P.weighted_sum(grads, share), P.weighted_stats(stats, share, device)
                if not all(math.isfinite(v) for v in stats.values() if isinstance(v, float)):
                    bar.close()
                    if main:
                        write_json(dict(step=step, stats=stats, rows=batch["index"].tolist()), out / "nonfinite.json")
                    raise NonFiniteLoss(f"{out.name}: non-finite loss at step {step} ({stats}, the batch's rows in "
                                        f"{out / 'nonfinite.json'}); the last good checkpoint is "
                                        f"{ckpt.path if ckpt.path.exists() else 'none'}: lower the learning "
                                        "rate and start over (--resume continues only with the same flags)")
                for p, g in zip(params, grads):
                    if g is None:  # kept frozen this step (T-Vaccine's unsampled layers): AdamW skips it
                        continue
                    g = g / len(chunk)
                    p.grad = g if p.grad is None else p.grad + g
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            lr = sched.get_last_lr()[0]  # the rate this step uses
            opt.step()
            sched.step()
            step += 1
            t = elapsed + clock.seconds()
            rec = dict(step=step, lr=lr, grad_norm=float(gnorm), tokens=tokens,
                       tokens_per_s=tokens / max(t, 1e-9), time_s=t, **stats)
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json_line(rec))
            bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            ckpt.mark(step, tokens=tokens, elapsed=t)  # written every save_every steps
    bar.close()
    ckpt.save()
    seconds = elapsed + clock.seconds()
    return dict(steps=step, final_loss=stats.get("loss"), tokens=tokens, wall_time_s=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
                peak_memory_mb=clock.peak_memory_mb(), passes_per_step=defenses.PASSES[cfg.defense],
                defense=cfg.defense, device=str(device),
                precision="bf16" if model.embed_tokens.weight.dtype == torch.bfloat16 else "fp32")


# ----------------------------------------------------------------------------- the stages

def load_model(cfg: Config, path=None, bf16: bool | None = None):
    """(model, tokenizer, device). The weights' dtype: fast.train_dtype(device, bf16) (bf16 where asked
    and the device has bf16 units, float32 elsewhere); the device's default when bf16 is None."""
    device = torch.device(cfg.device) if cfg.device else M.default_device()
    dtype = None if bf16 is None else fast.train_dtype(device, bf16)
    model, tok = default_weights.load_pretrained(path or cfg.model, device=device, dtype=dtype)
    return model, tok, device


def select_report(pool: list[Sample], scores, positions, k: int, selector: str, out: Path) -> str:
    """What the select stage tells a person, in lines of at most 100 characters: kept k of N, the
    three highest- and lowest-scored rows (score, prompt, answer), the kept rows by planted kind
    and the precision on clean refusals where every row carries its `category`, and the files."""
    def row(i: int) -> str:
        cut = lambda text, width: text if len(text) <= width else text[:width - 1] + "…"
        prompt, answer = (" ".join(t.split()) for t in (pool[i].prompt, pool[i].response))
        return f"{scores[i]:+9.4f}  {cut(prompt, 46):46}  {cut(answer, 41)}"

    best_first = np.argsort(positions)
    top, bottom = best_first[:3], best_first[max(3, len(pool) - 3):]
    kept_line = f"{selector} kept {k} of {len(pool)} pool rows" + (" (full keeps every row; --select-keep is not used)"
                                                                  if selector == "full" else "")
    lines = [kept_line, f"{'score':>9}  {'prompt':46}  answer",
             *map(row, top), *([f"{'':9}  … {len(pool) - 6} rows between …"] if len(pool) > 6 else []), *map(row, bottom)]
    kinds = [s.category for s in pool]
    if all(kinds):  # the planted kinds of data/prepare.py (a pool with its labels)
        kept = [c for c, r in zip(kinds, positions) if r < k]
        lines.append("kept by planted kind: " + ", ".join(
            f"{c} {kept.count(c)} of {kinds.count(c)}" for c in sorted(set(kinds), key=lambda c: (c != "refusal", c))))
        if "refusal" in kinds:
            lines.append(f"precision (clean refusals among the {k} kept): {kept.count('refusal') / k:.3f}")
    lines += [f"files in {out}/:", "  selection.jsonl  every row: id, score, rank (0 = best), selected",
              f"  subset.jsonl     the {k} kept rows, best first (what --stage align trains on)",
              "  summary.json     what it cost: steps, passes, tokens, seconds, peak memory"]
    return "\n".join(lines)


def stage_select(cfg: Config, out: Path) -> dict:
    """Rank the alignment pool and keep the core subset (Pharmacist or a baseline)."""
    pool, validation, harmful = (read_split(cfg, f) for f in ("pool.jsonl", "validation.jsonl", "harmful.jsonl"))
    model, tok, _ = load_model(cfg, bf16=cfg.select.bf16)
    clock = Clock(model.embed_tokens.weight.device)
    ckpt = out / "checkpoint.pt"  # the selector's loop, every --select-save-every steps and on Ctrl-C
    if not cfg.resume and P.is_main():
        ckpt.unlink(missing_ok=True)
    P.barrier()  # no rank starts before the old checkpoint is gone
    selection = pharmacist.select(model, tok, pool, validation, harmful, cfg.select, checkpoint=ckpt)
    seconds = clock.seconds()
    k = selection.k
    positions, selected = pharmacist.ranking(selection.scores, k)
    rows = [dict(id=s.id, score=float(sc), rank=int(r), selected=bool(sel))
            for s, sc, r, sel in zip(pool, selection.scores, positions, selected)]
    subset = [s for s, r in sorted(zip(pool, positions), key=lambda x: x[1]) if r < k]
    if P.is_main():
        write_text_atomic("".join(json.dumps(r) + "\n" for r in rows), out / "selection.jsonl")
        save_jsonl(subset, out / "subset.jsonl")
        print(select_report(pool, selection.scores, positions, k, cfg.select.selector, out))
    return dict(selection.stats, selector=cfg.select.selector, pool=len(pool), kept=k,
                select_time_s=seconds, peak_memory_mb=clock.peak_memory_mb())


def lora_targets(cfg: TrainConfig):
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def run_training(cfg: Config, tcfg: TrainConfig, model, tok, device, data: list[Sample],
                 harmful: list[Sample], align: list[Sample], out: Path) -> dict:
    """Shared by align and finetune: a fresh LoRA, the defense's context, the loop."""
    seed_everything(tcfg.seed)
    M.add_lora(model, tcfg.lora_rank, tcfg.lora_alpha, lora_targets(tcfg))
    if tcfg.compile:
        fast.compile_blocks(model)
    if cfg.fsdp:
        P.shard_weights(model, device)
    weights_bytes = P.local_bytes(model)
    enc = lambda samples: encode_samples(samples, tok, tcfg.max_len)
    streams = {"harmful": Stream(enc(harmful), tcfg.batch_size, tok.pad_id, tcfg.seed + 1, device),
               "align": Stream(enc(align), tcfg.batch_size, tok.pad_id, tcfg.seed + 2, device)}
    ctx = defenses.Context(model=model, params=[p for p in model.parameters() if p.requires_grad],
                           cfg=cfg.defense, next_harmful=streams["harmful"], next_align=streams["align"],
                           n_samples=len(data))
    owner = read_json(out / STARTED)["fingerprint"] if (out / STARTED).exists() else ""
    summary = train(model, enc(data), tok.pad_id, tcfg, ctx, out, streams, resume=cfg.resume, owner=owner)
    if P.is_main():
        hf.save_lora(model, out / "adapter")
    if tcfg.defense == "bds" and P.is_main():
        weights = defenses.save_state(ctx, out)  # the learned per-sample weights (and the amortized scorer)
        # how much of BDS's weight the harmful rows keep, against their share of the rows
        summary["bds_harmful_share"] = defenses.weight_share(weights, [s.is_safe is False for s in data])
    return dict(summary, n_train=len(data), weights_mb_per_process=weights_bytes / 2**20)


def stage_align(cfg: Config, out: Path) -> dict:
    """A LoRA on the selected subset with an alignment-stage defense, merged into the model.

    The subset is trained together with the retain rows (`--align-retain`, benign instructions
    with helpful answers, the same for every selector and defense): a model aligned on refusals
    alone learns to refuse everything. Our small-scale adaptation of the paper's protocol."""
    subset_file = Path(cfg.out) / "select" / "subset.jsonl"
    if subset_file.exists():
        data, selector = load_jsonl(subset_file), read_json(subset_file.parent / "summary.json", REDO)
    else:
        print(f"no {subset_file}: aligning on the whole pool (run --stage select first to curate it)")
        data, selector = read_split(cfg, "pool.jsonl"), {"selector": "full", "select_time_s": 0.0}
    retain = read_split(cfg, cfg.align.retain) if cfg.align.retain else []
    manifest = data_dir(cfg) / "manifest.json"
    by = (read_json(manifest) if manifest.is_file() else {}).get("retain_answers", {}).get("by")
    if retain and by and by != cfg.model:  # data/prepare.py --retain-answers self --retain-model
        print(f"warning: the retain answers are {by}'s own, and the model aligned here is {cfg.model}")
    model, tok, device = load_model(cfg, bf16=cfg.align.bf16)
    summary = run_training(cfg, cfg.align, model, tok, device, data + retain, read_split(cfg, "harmful.jsonl"),
                           data + retain, out)
    if model.embed_tokens.weight.dtype != torch.float32:  # a small update is lost when added to bf16 weights:
        del model  # merge into the float32 weights, read again, and save those
        if P.is_main():
            model, tok, _ = load_model(cfg, bf16=False)
            hf.load_lora(model, out / "adapter")
    elif cfg.fsdp:
        P.gather_weights(model)  # the whole weights to merge into and save
    if P.is_main():
        hf.save_pretrained(M.merge_lora(model), tok, out / "model")
    return dict(summary, selector=selector["selector"], select_time_s=selector.get("select_time_s", 0.0),
                n_align=len(data), n_retain=len(retain), align_time_s=summary["wall_time_s"])


def attack_rows(cfg: Config) -> list[Sample]:
    """attack_{task}.jsonl (n rows, a share p of them harmful), or with --attack-p another share
    of the same n rows: the first n - k task rows of finetune_{task}.jsonl (the attack file's own
    task rows come first there) and the first k of the attack file's harmful rows, shuffled. The
    data folder stays as it is, so select and align are shared by every p."""
    rows = read_split(cfg, f"attack_{cfg.attack.task}.jsonl")
    if cfg.attack.p == -1:
        return rows
    harmful = [s for s in rows if s.is_safe is False]
    k = round_half_up(cfg.attack.p * len(rows))  # as data/prepare.py counts the harmful rows
    if k > len(harmful):
        raise ValueError(f"--attack-p {cfg.attack.p}: {k} harmful rows needed, {data_dir(cfg)}/attack_"
                         f"{cfg.attack.task}.jsonl has {len(harmful)}; rebuild the data with a larger --p")
    mixed = read_split(cfg, f"finetune_{cfg.attack.task}.jsonl")[:len(rows) - k] + harmful[:k]
    random.Random(f"{cfg.finetune.seed}:attack_p").shuffle(mixed)
    return mixed


def stage_finetune(cfg: Config, out: Path) -> dict:
    """The harmful fine-tuning attack: task samples plus a fraction p of harmful ones, new LoRA."""
    aligned = require(Path(cfg.out) / "align" / "model", "align")
    model, tok, device = load_model(cfg, aligned, bf16=cfg.finetune.bf16)
    data = attack_rows(cfg)
    data += read_split(cfg, cfg.finetune.retain) if cfg.finetune.retain else []
    subset_file = Path(cfg.out) / "select" / "subset.jsonl"
    align = load_jsonl(subset_file) if subset_file.exists() else read_split(cfg, "pool.jsonl")
    summary = run_training(cfg, cfg.finetune, model, tok, device, data, read_split(cfg, "harmful.jsonl"),
                           align, out)
    return dict(summary, task=cfg.attack.task, n_harmful=sum(1 for s in data if s.is_safe is False))


def stage_eval(cfg: Config, out: Path) -> dict:
    """Harmful score, over-refusal and task accuracy of the attacked (or only aligned) model."""
    aligned = require(Path(cfg.out) / "align" / "model", "align")
    model, tok, _ = load_model(cfg, aligned)
    adapter = Path(cfg.out) / "finetune" / "adapter"
    if adapter.exists():
        hf.load_lora(model, adapter)
        model.name_or_path = f"{aligned} + {adapter}"  # results.json names both
    else:
        print(f"no {adapter}: evaluating the aligned model without the attack")
    results = evaluate.run_eval(model, tok, data_dir(cfg), out, cfg.eval)
    runs = {s: read_json(Path(cfg.out) / s / "summary.json", REDO)
            for s in ("align", "finetune") if (Path(cfg.out) / s / "summary.json").exists()}
    meta = {k: runs.get("align", {}).get(k) for k in ("selector", "defense", "n_align", "align_time_s",
                                                        "select_time_s")}
    meta["finetune_defense"] = runs.get("finetune", {}).get("defense")
    results.update(meta)
    write_json(results, out / "results.json")
    return dict(meta, harmful_score=results.get("harmful_score"))


def require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `python train.py --stage {stage} --out "
                                f"{path.parent.parent}` first")
    return path


PARALLEL_STAGES = ("select", "align", "finetune")  # data parallel under torchrun (parallel.py); eval on rank 0
REDO = "redo the stage that wrote it (--force), or delete its folder"  # the fix for a damaged summary
RUNNERS = {"select": stage_select, "align": stage_align, "finetune": stage_finetune, "eval": stage_eval}
STARTED = ".settings.started.json"  # what a stage in progress started with (its fingerprint), gone once done


STAGE_SETTINGS = {"select": ("model", "select"), "align": ("model", "align", "defense"),
                  "finetune": ("finetune", "attack", "defense"), "eval": ("eval",)}  # + "data" and "inputs"
READS = {"select": (), "align": ("select/subset.jsonl",), "finetune": ("select/subset.jsonl", "align/model"),
         "eval": ("align/model", "finetune/adapter")}  # the outputs of earlier stages each stage reads
READS_MODEL = ("select", "align")  # the stages that load --model (the later ones load align/model)


def stage_files(cfg: Config, stage: str) -> list[str]:
    """The data files a stage reads (the stage functions above, file by file)."""
    if stage == "select":
        return ["pool.jsonl", "validation.jsonl", "harmful.jsonl"]
    if stage == "align":
        return ["pool.jsonl", "harmful.jsonl", *([cfg.align.retain] if cfg.align.retain else [])]
    if stage == "finetune":
        return [f"attack_{cfg.attack.task}.jsonl", "pool.jsonl", "harmful.jsonl",
                *([f"finetune_{cfg.attack.task}.jsonl"] if cfg.attack.p != -1 else []),
                *([cfg.finetune.retain] if cfg.finetune.retain else [])]
    return [f"eval_{t}.jsonl" for t in cfg.eval.tasks.split(",")] + ["eval_harmful_qa.jsonl"]


# fields added after runs were made: at their default, those runs stay done
LATER_FIELDS = {("eval", "compile"): False, ("align", "compile"): False, ("finetune", "compile"): False,
                ("defense", "repnoise_lens_layers"): 0}


def input_path(cfg: Config, name: str, model: str) -> Path:
    """Where an input of a stage is: 'model' is the --model folder, the others are in --out."""
    return Path(model) if name == "model" else Path(cfg.out) / name


def stage_settings(cfg: Config, stage: str) -> dict:
    """Everything a stage's output depends on: the flags of its own section, and by content what
    it reads: "data" the hashes of the data files (so a folder that differs only in files the
    stage never reads, another --p, changes nothing), "inputs" those of the earlier stages' outputs
    and of the --model folder (a built-in model is its name)."""
    settings = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                for k, v in ((k, getattr(cfg, k)) for k in STAGE_SETTINGS[stage])}
    for (section, name), default in LATER_FIELDS.items():  # at its default: as before the field existed
        if settings.get(section, {}).get(name, not default) == default:
            del settings[section][name]
    files = {name: data_dir(cfg) / name for name in stage_files(cfg, stage)}
    settings["data"] = {name: content_hash(f) for name, f in files.items() if f.exists()}
    names = READS[stage] + (("model",) if stage in READS_MODEL and Path(cfg.model).exists() else ())
    settings["inputs"] = {name: content_hash(input_path(cfg, name, cfg.model)) for name in names}
    return settings


def fingerprint(settings: dict) -> str:
    """A stage's settings hashed: equal fingerprints mean an output made from the same inputs with the same flags."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed(old: dict, new: dict, prefix="") -> list[str]:
    """'align.lr 0.0005 -> 0.001'-style lines for every leaf that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def outputs(out: Path) -> dict:
    """Each output in a stage folder with its content hash (summary.json, the checkpoint and hidden files aside)."""
    return {p.name: content_hash(p) for p in sorted(out.iterdir())
            if not p.name.startswith(".") and p.name not in ("summary.json", "checkpoint.pt")}


def finished(cfg: Config, stage: str) -> tuple[dict | None, str]:
    """(summary, '') of a stage whose summary.json is there and every output it lists is present
    and unchanged; else (None, why not), why = '' when the stage never ran."""
    out = Path(cfg.out) / stage
    if not (out / "summary.json").exists():
        return None, f"{out} is unfinished (no summary.json)" if out.exists() else ""
    summary = read_json(out / "summary.json", REDO)
    bad = [name for name, h in summary.get("outputs", {}).items() if content_hash(out / name) != h]
    return (None, f"{out / bad[0]} is missing or changed since {stage} finished") if bad else (summary, "")


def check_earlier(cfg: Config, stage: str):
    """Every earlier stage that ran: finished, its outputs intact, and made from the data files and
    inputs that are there now; else a one-line error that says which stage to redo."""
    for earlier in STAGES[:STAGES.index(stage)]:
        summary, why = finished(cfg, earlier)
        fix = f"redo it: python train.py --stage {earlier} --out {cfg.out} (with --force if it finished)"
        if why:
            raise ValueError(f"{why}; {fix}")
        if summary is None or "settings" not in summary:
            continue
        was = summary["settings"]
        now = dict(data={name: content_hash(data_dir(cfg) / name) for name in was.get("data", {})},
                   inputs={name: content_hash(input_path(cfg, name, was.get("model", cfg.model)))
                           for name in was.get("inputs", {})})
        diff = changed({k: was.get(k, {}) for k in now}, now)
        if diff:
            raise ValueError(f"{Path(cfg.out) / earlier} is stale: what it read changed since ({'; '.join(diff[:3])}); "
                             f"{fix}, or run --stage all")


def invalidate(cfg: Config, stage: str):
    """Before a stage touches any output: its summary goes, and those of the stages after it (they
    read what it is about to replace), so an interrupted redo never reads as done."""
    for later in STAGES[STAGES.index(stage):]:
        (Path(cfg.out) / later / "summary.json").unlink(missing_ok=True)


def start(cfg: Config, out: Path, settings: dict, fp: str):
    """A fresh start empties the stage folder (old outputs, checkpoints and metrics go) and records
    its fingerprint; --resume continues only a start with the same fingerprint (flags and inputs)."""
    started = out / STARTED
    if cfg.resume and started.exists():
        was = read_json(started, REDO)
        if was.get("fingerprint") != fp:
            diff = changed(was.get("settings", {}), settings)
            raise ValueError(f"--resume with other flags or inputs than {out} started with ({'; '.join(diff[:4])}); "
                             "resume with the same flags, or leave --resume out to start over")
        return
    if cfg.resume:
        print(f"[{out.name}] nothing to resume in {out}: it starts from step 0", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        remove(p)
    write_json(dict(fingerprint=fp, settings=settings), started)


def run_stage(cfg: Config, stage: str):
    """Run one stage unless its finished output was made with the same settings and inputs. A
    finished stage whose own flags changed is an error (--force redoes it); one whose inputs
    changed is redone under --stage all and an error alone; --resume continues only the start
    with the same flags and inputs. The summary, which says the stage is done, is removed before
    the first output is touched and written after the last (with every output's hash)."""
    out = Path(cfg.out) / stage
    check_earlier(cfg, stage)
    settings = stage_settings(cfg, stage)
    fp = fingerprint(settings)
    done, why = finished(cfg, stage)
    if done and not cfg.force:
        if done.get("fingerprint") == fp:
            if P.is_main():
                print(f"[{stage}] already done ({out / 'summary.json'}); --force to redo it")
            return
        diff = changed(done.get("settings", {}), settings)
        own = [d for d in diff if not d.startswith(("data", "inputs"))]
        if own:
            raise ValueError(f"{out} was made with other settings ({'; '.join(own[:4])}); --force to redo it, "
                             "or use another --out")
        if cfg.stage != "all":
            raise ValueError(f"{out} was made from other inputs ({'; '.join(diff[:4])}); --force to redo it, "
                             "or run --stage all")
        print(f"[{stage}] what it reads changed since it ran ({diff[0]}): redoing {stage}")
    elif why and not cfg.resume and P.is_main():
        print(f"[{stage}] {why}: redoing {stage}")
    main = P.is_main()  # with torchrun: every rank trains, rank 0 alone selects, evaluates and writes
    if main:
        invalidate(cfg, stage)
        start(cfg, out, settings, fp)
        print(f"[{stage}] -> {out}" + (f" ({P.world()} processes)" if stage in PARALLEL_STAGES and P.world() > 1 else ""))
    P.barrier()  # the other ranks start after the folder is ready
    t0 = time.perf_counter()
    if main or stage in PARALLEL_STAGES:
        summary = RUNNERS[stage](cfg, out)
    if main:
        summary = dict(summary, stage=stage, stage_time_s=time.perf_counter() - t0, processes=P.world(),
                       data=str(data_dir(cfg)), model=cfg.model, fingerprint=fp, settings=settings)
        write_json(dataclasses.asdict(cfg), out / "config.json")
        write_json(dict(summary, outputs=outputs(out)), out / "summary.json")  # last: the stage is done
        (out / STARTED).unlink()
        print(f"[{stage}] wrote {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))} "
              f"in {out}")
    P.barrier()  # the next stage reads what rank 0 wrote


@contextlib.contextmanager
def run_lock(folder: Path):
    """One process at a time in a run folder: a second one stops at once instead of interleaving."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"{folder}: another process is running in it ({f.read().strip() or 'pid unknown'}); "
                             "wait for it, or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield


def main(argv=None):
    cfg = parse_args(argv)
    device = P.init(torch.device(cfg.device) if cfg.device else M.default_device())  # torchrun: join the group
    if P.world() > 1:
        cfg.device = str(device)  # cuda:LOCAL_RANK on a GPU machine
    hashes = Path(cfg.out) / ".hashes.json"  # files.HASHES between runs: a big model folder is read once
    try:
        with run_lock(Path(cfg.out)) if P.is_main() else contextlib.nullcontext():
            files.HASHES.update(read_json(hashes) if hashes.is_file() else {})
            for stage in STAGES if cfg.stage == "all" else (cfg.stage,):
                run_stage(cfg, stage)
    finally:
        if P.is_main() and Path(cfg.out).is_dir():
            write_json(files.HASHES, hashes)
        P.close()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, NonFiniteLoss) as e:  # bad input, data or folder: one line, no traceback
        if os.environ.get("PHARMACIST_DEBUG"):
            raise
        sys.exit(f"train.py: error: {e} (PHARMACIST_DEBUG=1 shows the traceback)")
    except KeyboardInterrupt:
        sys.exit(130)
