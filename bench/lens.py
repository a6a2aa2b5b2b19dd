"""RepNoise's logit lens on fewer layers: what a step costs, and what it changes in RepNoise's own
losses.

    python bench/lens.py --data runs/paper/s0/data --layers 0,10,6,3,1
    python bench/lens.py --data runs/paper/s0/data --runs all=runs/paper/s0/lens_all six=runs/paper/s0/pharmacist_repnoise_k160

RepNoise (defenses.repnoise_step) ascends the harmful loss read through the logit lens of every
layer: the final norm and the LM head on each layer's output, a (tokens x vocab) product forward
and again in backward. On SmolLM2-135M (30 layers, a 49k vocabulary) those products are most of a
step. `--defense-repnoise-lens-layers N` reads N layers spread over the depth (defenses.lens_layers).

Without --runs: the time of one RepNoise step (forward and backward, the optimizer aside) with each
lens size of --layers (0: every layer), beside SFT's step, on the same alignment and harmful batch
of the data folder, in one process, the variants alternating; the median of --repeats after one
warm-up each, and each as a multiple of SFT's.

With --runs name=RUN ...: each run's aligned model (RUN/align/model) measured the same way whatever
lens it trained with: the refusal loss on --rows rows of the alignment pool, the harmful loss
through every layer's lens (mean) and through the model's own output, and the MMD of the MLP
outputs to noise; what RepNoise's loss holds when its lens is cut.
Writes results/repnoise_lens[_runs].{md,json}.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import default_weights  # noqa: E402
import defenses as D  # noqa: E402
import fast  # noqa: E402
import model as M  # noqa: E402
from data.batches import IGNORE, collate, encode_samples, sample_losses, token_mean  # noqa: E402
from data.samples import load_jsonl  # noqa: E402

RESULTS = ROOT / "results"


def batch_of(rows, tok, device, max_len: int = 128) -> dict:
    b = collate(encode_samples(rows, tok, max_len), tok.pad_id)
    return {k: v.to(device) for k, v in b.items()}


def step_times(model, align: dict, harmful: dict, sizes: list[int], repeats: int) -> dict:
    """Median seconds of one step's gradients: SFT, and RepNoise with each lens size."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps = {"sft": lambda: D.sft_step(D.Context(model=model, params=params), align)}
    for n in sizes:
        ctx = D.Context(model=model, params=params, cfg=D.DefenseConfig(repnoise_lens_layers=n),
                        next_harmful=lambda: harmful)
        steps[f"repnoise, lens {n or 'every'}"] = lambda ctx=ctx: D.repnoise_step(ctx, align)
    times = {name: [] for name in steps}
    for r in range(repeats + 1):  # the first round warms up and is not counted
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            print(f"round {r}: {name} {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def own_losses(model, align: dict, harmful: dict) -> dict:
    """RepNoise's three terms, every layer's lens counted: refusal loss, harmful lens loss (mean
    over layers and the last layer's), MMD of the MLP outputs on the answer tokens to noise."""
    mlp_out, layer_out = {}, {}
    with D.hooks([layer.mlp for layer in model.layers], lambda i, out: mlp_out.__setitem__(i, out)), \
            D.hooks(model.layers, lambda i, out: layer_out.__setitem__(i, out)):
        model.hidden(harmful["input_ids"])
    labels = harmful["labels"]
    lens = [float(token_mean(sample_losses(layer_out[i], labels, model.head), labels)) for i in range(len(model.layers))]
    answer = (labels != IGNORE)[..., None].float()
    torch.manual_seed(0)
    mmd = statistics.mean(float(D.mmd((mlp_out[i].float() * answer).flatten(1),
                                      (torch.randn_like(mlp_out[i], dtype=torch.float32) * answer).flatten(1)))
                          for i in range(len(model.layers)))
    refusal = float(D.batch_loss(model, align))
    return dict(refusal_loss=refusal, lens_loss_mean=statistics.mean(lens), lens_loss_last=lens[-1], mmd=mmd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a data folder of data/prepare.py (pool.jsonl, harmful.jsonl)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", default="0,10,6,3,1", help="lens sizes to time (0: every layer)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="rows of each batch when timing (the align stage's)")
    p.add_argument("--rows", type=int, default=64, help="rows of each set when measuring --runs")
    p.add_argument("--runs", nargs="*", default=[], help="name=RUN: aligned runs to measure")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "pool.jsonl").is_file() or not (data / "harmful.jsonl").is_file():
        p.error(f"--data {data}: needs pool.jsonl and harmful.jsonl (a data/prepare.py folder)")
    runs = dict(r.split("=", 1) for r in args.runs if "=" in r)
    missing = [r for r in args.runs if "=" not in r] + [r for r in runs.values() if not (Path(r) / "align" / "model").is_dir()]
    if missing:
        p.error(f"--runs {missing[0]}: write name=RUN, RUN a run folder with align/model")
    torch.manual_seed(0)
    device = M.default_device()
    dtype = fast.train_dtype(device, True)
    pool = [s for s in load_jsonl(data / "pool.jsonl") if s.category == "refusal"]
    harmful_rows = load_jsonl(data / "harmful.jsonl")
    command = "python bench/lens.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not runs:
        model, tok = default_weights.load_pretrained(args.model, device=device, dtype=dtype)
        M.add_lora(model, 8, 16, M.LORA_TARGETS)
        model.train()
        align, harmful = batch_of(pool[:args.batch], tok, device), batch_of(harmful_rows[:args.batch], tok, device)
        sizes = [int(n) for n in args.layers.split(",")]
        times = step_times(model, align, harmful, sizes, args.repeats)
        lines = ["| step | lens layers | seconds | x SFT |", "|---|---|---|---|"]
        for name, t in times.items():
            n = name.split("lens ")[-1] if "lens" in name else "-"
            count = len(model.layers) if n == "every" else n
            lines.append(f"| {name.split(',')[0]} | {count} | {t:.2f} | {t / times['sft']:.1f} |")
        out, record = RESULTS / "repnoise_lens", dict(times=times, layers=len(model.layers))
    else:
        lines = ["| run | refusal loss | harmful loss, every lens (mean) | harmful loss, output | MMD |",
                 "|---|---|---|---|---|"]
        record = {}
        for name, run in runs.items():
            model, tok = default_weights.load_pretrained(str(Path(run) / "align" / "model"), device=device, dtype=dtype)
            model.eval()
            align = batch_of(pool[:args.rows], tok, device)
            harmful = batch_of(harmful_rows[:args.rows], tok, device)
            record[name] = dict(run=run, **own_losses(model, align, harmful))
            r = record[name]
            lines.append(f"| {name} | {r['refusal_loss']:.3f} | {r['lens_loss_mean']:.3f} | {r['lens_loss_last']:.3f} "
                         f"| {r['mmd']:.4f} |")
        out = RESULTS / "repnoise_lens_runs"
    text = "\n".join(lines) + f"\n\n{device}, {dtype}, {torch.get_num_threads()} thread(s); command: `{command}`\n"
    print(text)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(record, command=command), indent=1) + "\n")


if __name__ == "__main__":
    main()
