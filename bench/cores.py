"""One process with every thread against one process per core, on the same LoRA steps.

    python bench/cores.py [--model smollm2-135m-instruct] [--data data/default] [--seconds 60] [--rounds 3] [--bf16] [--compile]

A multi-threaded matrix product splits its work evenly between the cores and ends when the slower
core ends. Where a host slows its cores down one at a time (a shared machine whose other tenants
load a core's sibling), a step with two threads runs at twice the slower core's rate, while two
one-thread processes each run at their own core's rate. Two measurements, each alternating its
two sides so that a slow spell of the machine hits both:

  trace  the rate of one matmul at the MLP's shape (8 x 128 rows), with one thread and with all,
         back to back, for --trace-seconds: how the two compare moment by moment;
  steps  LoRA steps on the alignment batches of --data (pool and retain rows, batch 8, at most
         128 tokens: train.py's own batches; r 8 on every projection, AdamW; compiled blocks with
         --compile) for --seconds: one process with every thread, then one process per thread
         with one thread each, started together, each taking every n-th batch; tokens/s of each
         side (the second summed over its processes), per round.

This is what `bench/reproduce.py --jobs` builds on. Writes results/speed/cores_<device>_<processor>.{md,json}.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import default_weights  # noqa: E402
import defenses as D  # noqa: E402
import model as M  # noqa: E402
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


def worker(args):
    """One side's process: load, warm up (and compile), say 'ready', wait for 'go' on stdin, then
    step for --seconds over every --stride-th batch from --offset; print its tokens as json."""
    dtype = M.train_dtype(torch.device("cpu"), args.bf16)
    model, tok = default_weights.load_pretrained(args.model, device=torch.device("cpu"), dtype=dtype)
    M.add_lora(model, 8, 16, M.LORA_TARGETS)
    model.train()
    if args.compile:
        M.compile_blocks(model)
    folder = Path(args.data)
    rows = load_jsonl(folder / "pool.jsonl") + (load_jsonl(folder / "retain.jsonl") if (folder / "retain.jsonl").exists() else [])
    examples = encode_samples(rows, tok, 128)
    batches = Batches(examples, 8, tok.pad_id, seed=0).epoch(0)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    steps = [train_step(lambda b=b: D.batch_loss(model, b), opt) for b in batches]
    for step in steps[:3]:
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    t0, i, tokens, done = time.perf_counter(), args.offset, 0, 0
    while time.perf_counter() - t0 < args.seconds:
        steps[i % len(steps)]()
        tokens += int(batches[i % len(steps)]["attention_mask"].sum())
        i, done = i + args.stride, done + 1
    print(json.dumps({"tokens": tokens, "steps": done, "seconds": time.perf_counter() - t0}), flush=True)


def side(args, procs: int, threads: int) -> float:
    """tokens/s of `procs` worker processes of `threads` threads each, started together."""
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--data", args.data,
           "--seconds", str(args.seconds), "--stride", str(procs)] + ["--bf16"] * args.bf16 + ["--compile"] * args.compile
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
    return sum(o["tokens"] / o["seconds"] for o in outs)


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
    p.add_argument("--compile", action="store_true", help="compiled blocks (model.compile_blocks), as --align-compile")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stride", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    threads = torch.get_num_threads()
    if threads < 2:
        sys.exit("bench/cores.py compares one process with every thread against one per thread: "
                 f"this process has {threads} thread (set OMP_NUM_THREADS to 2 or more)")
    device, dtype = torch.device("cpu"), M.train_dtype(torch.device("cpu"), args.bf16)
    cfg = M.read_config(Path(args.model) if Path(args.model).exists() else default_weights.resolve(args.model))
    k, n = cfg.hidden_size, cfg.intermediate_size
    pairs = trace(8 * 128, k, n, args.trace_seconds, dtype)
    one, all_ = [a for a, _ in pairs], [b for _, b in pairs]
    ratios = [b / a for a, b in pairs]
    rounds = []
    for _ in range(args.rounds):
        rounds.append((side(args, 1, threads), side(args, threads, 1)))
    name = f"{device.type}{'-bf16' if dtype == torch.bfloat16 else ''}"
    lines = [f"{args.model}, {processor(device)}, {threads} threads, {str(dtype).removeprefix('torch.')}, "
             f"torch {torch.__version__}", "",
             f"Matmul {8 * 128} x {k} x {n}, {len(pairs)} samples over {args.trace_seconds:.0f} s (each the median "
             "of 9 calls), TFLOP/s, lower quartile / median / upper quartile:", "",
             f"| 1 thread | {threads} threads | {threads} threads / 1 thread |", "|---|---|---|",
             f"| {quartiles(one)} | {quartiles(all_)} | {statistics.quantiles(ratios, n=4)[0]:.2f} / "
             f"{statistics.median(ratios):.2f} / {statistics.quantiles(ratios, n=4)[2]:.2f} |", "",
             f"Share of samples where {threads} threads run below 1.2x one thread: "
             f"{sum(r < 1.2 for r in ratios) / len(ratios):.0%}; at or above 1.8x: {sum(r >= 1.8 for r in ratios) / len(ratios):.0%}.",
             "", f"LoRA steps ({'compiled blocks' if args.compile else 'eager'}), batches of {args.data}, "
             f"{args.seconds:.0f} s a side a round, tokens/s:", "",
             f"| round | 1 process x {threads} threads | {threads} processes x 1 thread (sum) | ratio |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {a:.0f} | {b:.0f} | {b / a:.2f}x |" for i, (a, b) in enumerate(rounds)]
    total_a, total_b = sum(a for a, _ in rounds), sum(b for _, b in rounds)
    lines += [f"| all | {total_a / len(rounds):.0f} | {total_b / len(rounds):.0f} | {total_b / total_a:.2f}x |"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = results_file(device, dtype, prefix="cores_")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "trace": pairs, "rounds": rounds}, indent=2))
    out.with_suffix(".md").write_text(text + f"\ncommand: python bench/cores.py {shlex.join(sys.argv[1:])}\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
