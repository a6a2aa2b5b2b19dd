"""One process with every thread against one process per core, one thread per core, and one step
split over the cores, in threads or in processes, on the same LoRA steps.

    python bench/cores.py [--model smollm2-135m-instruct] [--data data/default] [--seconds 60] [--rounds 3]
                          [--bf16] [--compile] [--sides threads,procs,pythreads,split,ranks,ranks-parts]

A multi-threaded matrix product splits its work evenly between the cores and ends when the slower
core ends. Where a host slows its cores down one at a time (a shared machine whose other tenants
load a core's sibling), a step with two threads runs at twice the slower core's rate, while two
one-thread processes each run at their own core's rate, and so, mostly, do the Python threads of
one process (the interpreter lock they share costs some). Two measurements, each alternating its
sides so that a slow spell of the machine hits all alike:

  trace  the rate of one matmul at the MLP's shape (8 x 128 rows), with one thread and with all,
         back to back, for --trace-seconds: how the two compare moment by moment;
  steps  LoRA steps on the alignment batches of --data (pool and retain rows, batch 8, at most
         128 tokens: train.py's own batches; r 8 on every projection, AdamW; compiled blocks with
         --compile) for --seconds, each side (SIDES) one way to use the N cores:
           threads      one process with every thread (a training run as it is);
           procs        one process per core, one thread each, started together, each taking every
                        N-th batch: N independent jobs (`bench/reproduce.py --jobs`);
           pythreads    one process, one Python thread per core with one intra-op thread and its own
                        copy of the model, each taking every N-th batch;
           split        one process whose every step cuts its batch into parts that one worker thread
                        per core takes from a queue (Threads);
           ranks        one process per core as the ranks of one run, each step's batch in shards
                        (torchrun's data parallelism as train.py runs it: parallel.py);
           ranks-parts  the same ranks taking each step's parts from a shared counter (Ranks);
         tokens/s of each side (procs and pythreads summed over their jobs), per round. All but
         procs and pythreads are the rate of one training run.

Writes results/speed/cores_<device>_<processor>.{md,json}.
"""
import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import default_weights  # noqa: E402
import defenses as D  # noqa: E402
import fast  # noqa: E402
import hf  # noqa: E402
import model as M  # noqa: E402
import parallel as P  # noqa: E402
from data.batches import Batches, encode_samples  # noqa: E402
from data.samples import load_jsonl  # noqa: E402
from speed import processor, results_file, train_step  # noqa: E402  (bench/, this file's folder)


def trace(rows: int, k: int, n: int, seconds: float, dtype) -> list[tuple[float, float]]:
    """(1-thread, all-thread) FLOP/s pairs of one (rows x k) @ (k x n) matmul, each the median of 9
    calls, taken back to back for `seconds`."""
    threads = torch.get_num_threads()
    a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    flop, pairs, t_end = 2 * rows * k * n, [], time.perf_counter() + seconds

    def rate():
        a @ b
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return flop / statistics.median(times)
    while time.perf_counter() < t_end:
        pair = []
        for t in (1, threads):
            torch.set_num_threads(t)
            pair.append(rate())
        pairs.append(tuple(pair))
    torch.set_num_threads(threads)
    return pairs


def in_order(values, shares):
    """sum_i shares_i * values_i, added in index order: the same bits whichever thread computed which."""
    total = 0
    for value, share in zip(values, shares):
        total = total + share * value
    return total


class Threads:
    """One step split over the cores: the batch is cut into `pieces` parts (parallel.part: rows
    i, i + pieces, ...), worker threads take the parts from one queue, each with a single
    intra-op thread, and the parts' gradients are summed as torchrun's ranks' are (parallel.py),

        g = sum_i (n_i / n) g_i,

    so the step is the step of the whole batch, up to the order of float additions. A matrix
    product split over all cores ends when the slowest core does; here each core runs parts at its
    own rate, and a faster core takes more of them. The parts are summed in part order, so the
    result does not depend on which thread ran which. For the sft step (the others keep state or
    move the shared weights within a step); one worker runs the step as it is, with every
    intra-op thread. A bench side, not a training option: it measures no faster than one step on
    all the cores (docs/RESULTS.md, "Two cores that slow down one at a time")."""

    def __init__(self, workers: int, pieces: int = 0):
        self.pieces = pieces or 2 * workers  # two parts a worker: a slower core holds up at most one
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="part",  # one intra-op thread each
                                       initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None

    def step(self, step_fn, ctx, batch):
        """step_fn(ctx, batch)'s (grads, stats), computed part by part in the worker threads; the
        float stats (the loss) as the share-weighted sum of the parts'."""
        if self.pool is None:
            return step_fn(ctx, batch)
        k = min(self.pieces, len(batch["labels"]))
        parts = [P.part(batch, i, k) for i in range(k)]
        done = list(self.pool.map(lambda p: step_fn(ctx, p[0]), parts))
        shares = [share for _, share in parts]
        grads = [in_order(gs, shares) for gs in zip(*(g for g, _ in done))]
        first = done[0][1]
        return grads, {k: in_order([st[k] for _, st in done], shares) if isinstance(v, float) else v
                       for k, v in first.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown()


class Ranks:
    """One step split over processes (torch.distributed over gloo, one intra-op thread each), two
    ways. `static`: torchrun's data parallelism as train.py runs it, each rank its shard of every
    batch (parallel.shard) and one share-weighted all-reduce of the gradients (parallel.weighted_sum).
    `parts`: the batch cut into `pieces` parts that the ranks take from a shared counter (a
    TCPStore's atomic add), so a faster core takes more of them; each rank writes each of its parts'
    gradients into that part's row of a (pieces x gradient) buffer, zeros elsewhere, one all-reduce
    fills every row (x + 0 is exact), and every rank sums the rows in part order, weighted by the
    parts' token shares: the same bits whichever rank ran which part. Bench sides, not training
    options: the shards are train.py's own data parallelism, and the parts measure no faster than
    them (docs/RESULTS.md, "Two cores that slow down one at a time")."""

    def __init__(self, mode: str, rank: int, world: int, port: int, pieces: int = 0):
        import torch.distributed as dist
        self.dist, self.mode, self.pieces = dist, mode, pieces or 2 * world
        self.store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
        dist.init_process_group("gloo", store=self.store, rank=rank, world_size=world)
        self.n = 0

    def step(self, ctx, batch) -> list[torch.Tensor]:
        """The sft step's gradients of the whole batch, the same on every rank."""
        if self.mode == "static":
            part, share = P.shard(batch)
            return P.weighted_sum(D.sft_step(ctx, part)[0], share)
        k = min(self.pieces, len(batch["labels"]))
        parts, self.n = [P.part(batch, i, k) for i in range(k)], self.n + 1
        sizes = [q.numel() for q in ctx.params]
        rows = torch.zeros(k, sum(sizes))
        while (i := self.store.add(f"step{self.n}", 1) - 1) < k:
            rows[i] = torch.cat([g.reshape(-1).float() for g in D.sft_step(ctx, parts[i][0])[0]])
        self.dist.all_reduce(rows)
        flat = in_order(rows, [share for _, share in parts])
        return [g.view_as(q).to(q.dtype) for g, q in zip(flat.split(sizes), ctx.params)]

    def go_on(self, yes: bool) -> bool:
        """Rank 0's word on whether to take another step, so that every rank stops together."""
        flag = torch.tensor([float(yes)])
        self.dist.broadcast(flag, 0)
        return bool(flag)

    def close(self):
        self.dist.destroy_process_group()


def worker(args):
    """One side's process: load, warm up (and compile), say 'ready', wait for 'go' on stdin, then
    step for --seconds over every --stride-th batch from --offset; print its tokens as json. With
    --in-threads N, N Python threads of one intra-op thread each do so, each on its own copy of
    the model and every (stride x N)-th batch; with --workers N, each step runs in parts on N
    worker threads (Threads); with --ranks MODE, the --stride processes are the ranks of one run
    (Ranks), every one stepping through every batch, and rank 0 counts the tokens."""
    dtype = fast.train_dtype(torch.device("cpu"), args.bf16)
    model, tok = default_weights.load_pretrained(args.model, device=torch.device("cpu"), dtype=dtype)
    M.add_lora(model, 8, 16, M.LORA_TARGETS)
    model.train()
    models = [model] + [copy.deepcopy(model) for _ in range(args.in_threads - 1)]
    if args.compile:
        for m in models:
            fast.compile_blocks(m)
    folder = Path(args.data)
    rows = load_jsonl(folder / "pool.jsonl") + (load_jsonl(folder / "retain.jsonl") if (folder / "retain.jsonl").exists() else [])
    examples = encode_samples(rows, tok, 128)
    batches = Batches(examples, 8, tok.pad_id, seed=0).epoch(0)
    ranks = Ranks(args.ranks, args.offset, args.stride, args.port) if args.ranks else None
    stride = 1 if ranks else args.stride * args.in_threads

    def stepper(m):
        params = [q for q in m.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        if not ranks and args.workers == 1:
            return [train_step(lambda b=b: D.batch_loss(m, b), opt) for b in batches]
        ctx = D.Context(model=m, params=params)
        if ranks:  # the whole batch's gradients from the ranks
            grads_of = lambda b: ranks.step(ctx, b)
        else:  # the sft step's gradients from the parts
            parts = Threads(args.workers)
            grads_of = lambda b: parts.step(D.sft_step, ctx, b)[0]

        def step_on(b):  # the gradients, then AdamW (on every rank)
            def step():
                for q, g in zip(params, grads_of(b)):
                    q.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        return [step_on(b) for b in batches]
    steppers = [stepper(m) for m in models]
    for steps in steppers:
        for step in steps[:3]:
            step()
    done = [None] * args.in_threads

    def run(j, t0):
        if args.in_threads > 1:
            torch.set_num_threads(1)
        i, tokens, n = (0 if ranks else args.offset) + j * args.stride, 0, 0
        while (ranks.go_on(time.perf_counter() - t0 < args.seconds) if ranks
               else time.perf_counter() - t0 < args.seconds):
            steppers[j][i % len(batches)]()
            tokens += int(batches[i % len(batches)]["attention_mask"].sum())
            i, n = i + stride, n + 1
        done[j] = (tokens, n, time.perf_counter() - t0)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(j, t0)) for j in range(args.in_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if ranks:
        ranks.close()
        if args.offset > 0:  # the ranks took the same steps: rank 0 counts them
            done = [(0, 0, 1.0)]
    print(json.dumps({"tokens_per_s": sum(tok_ / s for tok_, _, s in done), "steps": sum(n for _, n, _ in done)}),
          flush=True)


def side(args, procs: int, threads: int, in_threads: int = 1, workers: int = 1, ranks: str = "") -> float:
    """tokens/s of `procs` worker processes of `threads` threads each, started together; with
    `in_threads` > 1, each process steps in that many Python threads of one intra-op thread each;
    with `workers` > 1, each step in parts on that many worker threads (Threads); with `ranks`,
    the processes are the ranks of one run (Ranks)."""
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--data", args.data,
           "--seconds", str(args.seconds), "--stride", str(procs), "--in-threads", str(in_threads),
           "--workers", str(workers), "--ranks", ranks, "--port", str(args.port)]
    cmd += ["--bf16"] * args.bf16 + ["--compile"] * args.compile
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    ps = [subprocess.Popen(cmd + ["--offset", str(r)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env=env, cwd=ROOT) for r in range(procs)]
    for p in ps:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a worker failed to start: {' '.join(cmd)}")
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.stdout.readline()) for p in ps]
    for p in ps:
        p.wait()
    return sum(o["tokens_per_s"] for o in outs)


SIDES = {  # name: (what it is, side()'s arguments but args, given the threads N)
    "threads": ("1 process x N threads", lambda n: dict(procs=1, threads=n)),
    "procs": ("N processes x 1 thread, each every N-th batch (sum)", lambda n: dict(procs=n, threads=1)),
    "pythreads": ("1 process, N Python threads x 1 thread, each its own model copy and every N-th batch (sum)",
                  lambda n: dict(procs=1, threads=n, in_threads=n)),
    "split": ("1 process, each step's batch in 2N parts taken by N worker threads of 1 thread",
              lambda n: dict(procs=1, threads=n, workers=n)),
    "ranks": ("N ranks x 1 thread, each step's batch in N shards (torchrun's data parallelism)",
              lambda n: dict(procs=n, threads=1, ranks="static")),
    "ranks-parts": ("N ranks x 1 thread, each step's batch in 2N parts taken from a shared counter",
                    lambda n: dict(procs=n, threads=1, ranks="parts")),
}


def quartiles(values) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0] / 1e12:.2f} / {statistics.median(values) / 1e12:.2f} / {q[2] / 1e12:.2f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(ROOT / "data" / "default"), help="a data folder: its pool.jsonl (and retain.jsonl)")
    p.add_argument("--seconds", type=float, default=60, help="stepping time of each side, per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trace-seconds", type=float, default=60)
    p.add_argument("--bf16", action="store_true", help="bf16 frozen weights where the CPU has bf16 units")
    p.add_argument("--compile", action="store_true", help="compiled blocks (fast.compile_blocks), as --align-compile")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--in-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ranks", default="", choices=["", "static", "parts"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29533, help="the TCP port of the ranks' store (the two ranks sides)")
    p.add_argument("--sides", default=",".join(SIDES), help="which sides to time, comma-separated, the first the "
                   f"one the others are compared with: {', '.join(f'{k} ({v[0]})' for k, v in SIDES.items())}")
    p.add_argument("--stride", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    threads = torch.get_num_threads()
    if threads < 2:
        sys.exit("bench/cores.py compares one process with every thread against one per thread: "
                 f"this process has {threads} thread (set OMP_NUM_THREADS to 2 or more)")
    device, dtype = torch.device("cpu"), fast.train_dtype(torch.device("cpu"), args.bf16)
    cfg = hf.read_config(Path(args.model) if Path(args.model).exists() else default_weights.resolve(args.model))
    k, n = cfg.hidden_size, cfg.intermediate_size
    pairs = trace(8 * 128, k, n, args.trace_seconds, dtype) if args.trace_seconds > 0 else []
    names = args.sides.split(",")
    if unknown := [s for s in names if s not in SIDES]:
        sys.exit(f"--sides: unknown {', '.join(unknown)}; the sides are {', '.join(SIDES)}")
    rounds = []
    for _ in range(args.rounds):
        rounds.append(tuple(side(args, **SIDES[s][1](threads)) for s in names))
    lines = [f"{args.model}, {processor(device)}, {threads} threads, {str(dtype).removeprefix('torch.')}, "
             f"torch {torch.__version__}", ""]
    if pairs:
        one, all_ = [a for a, _ in pairs], [b for _, b in pairs]
        ratios = [b / a for a, b in pairs]
        lines += [f"Matmul {8 * 128} x {k} x {n}, {len(pairs)} samples over {args.trace_seconds:.0f} s (each the "
                  "median of 9 calls), TFLOP/s, lower quartile / median / upper quartile:", "",
                  f"| 1 thread | {threads} threads | {threads} threads / 1 thread |", "|---|---|---|",
                  f"| {quartiles(one)} | {quartiles(all_)} | {statistics.quantiles(ratios, n=4)[0]:.2f} / "
                  f"{statistics.median(ratios):.2f} / {statistics.quantiles(ratios, n=4)[2]:.2f} |", "",
                  f"Share of samples where {threads} threads run below 1.2x one thread: "
                  f"{sum(r < 1.2 for r in ratios) / len(ratios):.0%}; at or above 1.8x: "
                  f"{sum(r >= 1.8 for r in ratios) / len(ratios):.0%}.", ""]
    heads = [SIDES[s][0].replace("2N", str(2 * threads)).replace("N-th", f"{threads}-th").replace("N ", f"{threads} ")
             for s in names]
    lines += [f"LoRA steps ({'compiled blocks' if args.compile else 'eager'}), batches of {args.data}, "
              f"{args.seconds:.0f} s a side a round, tokens/s:", "",
              "| round | " + " | ".join([heads[0]] + [f"{h} | ratio" for h in heads[1:]]) + " |",
              "|---|" + "---|" * (2 * len(names) - 1)]
    mean = [sum(r[j] for r in rounds) / len(rounds) for j in range(len(names))]
    lines += [f"| {name} | {r[0]:.0f} | " + " | ".join(f"{x:.0f} | {x / r[0]:.2f}x" for x in r[1:]) + " |"
              for name, r in [*((str(i + 1), r) for i, r in enumerate(rounds)), ("all", mean)]]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = results_file(device, dtype, prefix="cores_")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "trace": pairs, "rounds": rounds}, indent=2))
    out.with_suffix(".md").write_text(text + f"\ncommand: python bench/cores.py {shlex.join(sys.argv[1:])}\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
