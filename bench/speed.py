"""Our model against transformers + peft on the same weights and inputs, in one process.

    python bench/speed.py [--model smollm2-135m-instruct] [--batch 8] [--seq 128] [--gen-batch 16] [--bf16]
    python bench/speed.py --shape llama2-7b --batch 10 --seq 256 --bf16   # FLOP utilisation, random weights

With --bf16 (where the device has bf16 units) both models hold their frozen weights in bf16 and
their LoRA adapters in float32, each in its own best setting: ours as train.py runs it,
transformers + peft with SDPA attention and peft's float32 adapters; without it, both in float32.

Prints a markdown table of LoRA training tokens/s (random ids labelled at every token, and an
alignment batch whose prompt and padding carry no label), batched greedy generation tokens/s and
the cached load time, each as a ratio ours / theirs, the model FLOP/s of each LoRA step against
this machine's measured matmul rate, and writes results/speed/<device>_<processor>.{json,md}.
Each side computes its loss its own way: ours runs the LM head only where a label is predicted,
transformers + peft at every position.
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import default_weights  # noqa: E402
import defenses as D  # noqa: E402
import fast  # noqa: E402
import model as M  # noqa: E402
from data.batches import IGNORE, collate, encode_samples  # noqa: E402
from data.samples import load_jsonl  # noqa: E402

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def row(name, work, ours, theirs):
    """(measure, ours, theirs, speed ratio, ratio range): speeds are work / median seconds (or the
    seconds when work is None), the ratio is theirs / ours median seconds, and the min-max of each
    round's ratio shows the noise."""
    ratios = [t / o for o, t in zip(ours, theirs)]
    shown = (lambda t: t) if work is None else (lambda t: work / t)
    o, t = statistics.median(ours), statistics.median(theirs)
    return (name, shown(o), shown(t), t / o,
            f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-")


def timed(fns, device, repeats):
    """Seconds of each function in each of `repeats` rounds, after one warm-up call each; the
    functions alternate within a round, so a slow spell of the machine hits both alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return times


def processor(device) -> str:
    """The device's name: the GPU's, or the CPU model from /proc/cpuinfo (where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def device_name(device, dtype) -> str:
    return f"{device.type}{'-bf16' if dtype == torch.bfloat16 else ''}"


def results_file(device, dtype, prefix: str = "") -> Path:
    """results/speed/<prefix><device>_<processor> (no suffix), e.g. cpu-bf16_intel-r-xeon-r-processor."""
    words = "".join(c if c.isalnum() else " " for c in processor(device).lower()).split()
    out = ROOT / "results" / "speed" / f"{prefix}{device_name(device, dtype)}_{'-'.join(words[:8])}"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def matmul_rate(device, dtype, m: int, k: int, n: int, repeats: int = 10) -> float:
    """FLOP/s of one (m x k) @ (k x n) matmul in `dtype`, best of `repeats`: the rate this machine
    reaches on the model's own shapes, against which a step's FLOP/s is read."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def lora_step_flops(model, batch: int, seq: int, labelled: int, head_rows: int) -> float:
    """Model FLOPs of one LoRA training step (the work, not what an implementation spends):
    every frozen projection forward (2 per weight per token) and backward to its input (2 more),
    causal attention scores and values (2 x 2 B S^2 d / 2 forward per layer, twice that backward),
    the LM head on `head_rows` positions forward and backward (ours: the labelled positions only,
    transformers: every position), and each adapter forward and backward (input and weight: 6)."""
    frozen = lora = 0
    for name, p in model.layers.named_parameters():
        if name.endswith("weight") and p.ndim == 2:
            lora += p.numel() if "lora_" in name else 0
            frozen += 0 if "lora_" in name else p.numel()
    tokens = batch * seq
    d = model.config.num_attention_heads * (model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads)
    attention = 3 * 2 * batch * seq * seq * d * model.config.num_hidden_layers  # fwd 2BS^2d (causal half), bwd 2x
    head = 4 * head_rows * model.config.hidden_size * model.config.vocab_size
    return 4 * frozen * tokens + attention + head + 6 * lora * tokens


def train_step(loss_of, opt):
    def step():
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def matmul_table(cfg, device, dtype, rows: int) -> list[str]:
    """The matmul rate at each projection shape of a LoRA step over `rows` tokens: the forward
    products (rows x in x out) and the backward ones to the input (rows x out x in), with all the
    threads and with one (on a CPU), so a shape that leaves a core idle shows."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = sorted({(h, h), (h, kv), (kv, h), (h, cfg.intermediate_size), (cfg.intermediate_size, h)})
    threads = torch.get_num_threads()
    counts = (threads, 1) if device.type == "cpu" and threads > 1 else (threads,)
    lines = [f"{str(dtype).removeprefix('torch.')} matmul rate (TFLOP/s, best of 10) at the projections' shapes, "
             f"{rows} rows:", "", "| rows x k x n | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for k, n in shapes:
        rates = []
        for t in counts:
            torch.set_num_threads(t)
            rates.append(matmul_rate(device, dtype, rows, k, n))
        torch.set_num_threads(threads)
        lines.append(f"| {rows} x {k} x {n} | " + " | ".join(f"{r / 1e12:.2f}" for r in rates) + " |")
    return lines


def attention_table(cfg, device, dtype, batch: int, lengths=(64, 128, 256), repeats: int = 5) -> list[str]:
    """Forward + backward of one layer's attention at the model's head shape in `dtype`: SDPA as
    is, and `M.attend` (on a CPU in bf16: SDPA in float32 around casts), in ms."""
    import torch.nn.functional as F
    lines = [f"Attention forward + backward, one layer ({batch} x {cfg.num_attention_heads} heads x "
             f"{cfg.head_dim}, {cfg.num_key_value_heads} KV heads, {str(dtype).removeprefix('torch.')}):", "",
             "| length | SDPA as is (ms) | M.attend (ms) | SDPA / attend |", "|---|---|---|---|"]
    for T in lengths:
        q, k, v = (torch.randn(batch, h, T, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
                   for h in (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads))
        fwd_bwd = lambda f: lambda: f().sum().backward()
        plain = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        ours = fwd_bwd(lambda: M.attend(q, k, v, None, None, enable_gqa=True))
        t_p, t_o = (statistics.median(t) for t in timed([plain, ours], device, repeats))
        lines.append(f"| {T} | {t_p * 1e3:.1f} | {t_o * 1e3:.1f} | {t_p / t_o:.2f}x |")
    return lines


def shape_utilisation(spec: str, batch: int, seq: int, device, dtype, repeats: int) -> list[str]:
    """Our LoRA step (r 8 on every projection, every token labelled, AdamW) on a randomly
    initialised model of a given shape (bench/memory.py's built-in shapes or a config.json): its
    tokens/s and model FLOP utilisation against the measured matmul rate, no weights needed."""
    sys.path.insert(0, str(ROOT / "bench"))
    from memory import read_config
    cfg = read_config(spec)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = M.Transformer(cfg).to(dtype)
    model.to_empty(device=device)  # the weights in `dtype` at once: no float32 copy of a 7B model
    with torch.no_grad():
        for name, w in model.named_parameters():
            w.fill_(1.0) if "norm" in name else w.normal_(0, 0.02)
    model.inv_freq = M.rope_inv_freq(cfg, device)
    M.add_lora(model, 8, 16, M.LORA_TARGETS)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    [times] = timed([train_step(lambda: D.losses(model, {"input_ids": ids, "labels": ids}).mean(), opt)],
                    device, repeats)
    seconds = statistics.median(times)
    work = lora_step_flops(model, batch, seq, batch * (seq - 1), head_rows=batch * (seq - 1))
    peak = matmul_rate(device, dtype, batch * seq, cfg.hidden_size, cfg.intermediate_size)
    lines = [f"{spec} (random weights, {str(dtype).removeprefix('torch.')}), LoRA r 8 on every projection, "
             f"batch {batch} x {seq}, every token labelled, {repeats} rounds, {processor(device)}", "",
             "| tok/s | model TFLOP/s | matmul rate at the MLP shape (TFLOP/s) | model FLOP utilisation |",
             "|---|---|---|---|",
             f"| {batch * seq / seconds:.0f} | {work / seconds / 1e12:.3f} | {peak / 1e12:.3f} | "
             f"{work / seconds / peak:.0%} |"]
    if device.type == "cuda":
        lines.append(f"\npeak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    return lines


def training_batch(tok, batch: int, seq: int, device):
    """`batch` rows of the embedded alignment pool as the training loop sees them: prompt and
    right padding unlabelled (IGNORE), the loss on the response only."""
    rows = load_jsonl(ROOT / "data" / "default" / "pool.jsonl")[:batch]
    b = collate(encode_samples(rows, tok, seq), tok.pad_id)
    return b["input_ids"].to(device), b["labels"].to(device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gen-batch", type=int, default=None, help="prompts per greedy generation (default: --batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 frozen weights where the device has bf16 units (fast.train_dtype); fp32 otherwise")
    p.add_argument("--compile", action="store_true",
                   help="also time our compiled training step and static-shape decode step (compiles counted apart)")
    p.add_argument("--shape", default=None,
                   help="instead: our LoRA step's FLOP utilisation on a random-initialised model of this shape "
                        "(llama2-7b, qwen2-7b or a config.json; bench/memory.py)")
    args = p.parse_args()
    device = M.default_device()
    dtype = fast.train_dtype(device, args.bf16)
    if args.shape:
        text = "\n".join(shape_utilisation(args.shape, args.batch, args.seq, device, dtype, args.repeats)) + "\n"
        print(text)
        out = results_file(device, dtype, prefix=f"{Path(args.shape).stem}_").with_suffix(".md")
        out.write_text(text + f"\ncommand: python bench/speed.py {' '.join(sys.argv[1:])}\n")
        return
    import peft
    import transformers

    torch.manual_seed(0)
    folder = Path(args.model) if Path(args.model).exists() else default_weights.resolve(args.model)
    loaded = {}

    def load_ours():
        loaded["ours"] = default_weights.load_pretrained(args.model, device=device, dtype=dtype)

    def load_theirs():  # what a user waits for on both sides: the model and its tokenizer
        loaded["theirs"] = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa").to(device)
        transformers.AutoTokenizer.from_pretrained(folder)

    l_o, l_t = timed([load_ours, load_theirs], device, 3)  # the file is in the page cache after warm-up
    (ours, tok), theirs = loaded["ours"], loaded["theirs"]
    rows = [row("load (s, cached)", None, l_o, l_t)]

    ids = torch.randint(100, tok.tok.get_vocab_size() - 1, (args.batch, args.seq), device=device)
    M.add_lora(ours, 8, 16, M.LORA_TARGETS)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(M.LORA_TARGETS)))
    ours.train(), theirs.train()
    opt_o = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-4)
    opt_t = torch.optim.AdamW([q for q in theirs.parameters() if q.requires_grad], lr=1e-4)
    # ours: the training loop's own loss (defenses.losses); theirs: transformers' loss from labels
    our_step = lambda model, opt, x, y: train_step(lambda: D.losses(model, {"input_ids": x, "labels": y}).mean(), opt)
    batches = {"every token labelled": (ids, ids), "alignment batch": training_batch(tok, args.batch, args.seq, device)}
    flops = []
    for name, (x, y) in batches.items():
        s_o, s_t = timed([our_step(ours, opt_o, x, y), train_step(lambda: theirs(input_ids=x, labels=y).loss, opt_t)],
                         device, args.repeats)
        labelled = int((y[:, 1:] != IGNORE).sum())
        rows.append(row(f"LoRA train step, {name} {tuple(x.shape)}, {labelled} labels (tok/s)", x.numel(),
                        s_o, s_t))
        work = lora_step_flops(ours, *x.shape, labelled, head_rows=labelled)  # the work the loss needs
        flops.append((name, work, work / statistics.median(s_o), work / statistics.median(s_t)))

    compiled_steps = []
    if args.compile:  # our step with compiled blocks (fast.compile_blocks, --align-compile) against eager
        fused = fast.compile_blocks(copy.deepcopy(ours))
        opt_c = torch.optim.AdamW([q for q in fused.parameters() if q.requires_grad], lr=1e-4)
        for name, (x, y) in batches.items():
            step_c = our_step(fused, opt_c, x, y)
            t0 = time.perf_counter()
            step_c()  # the first: compiles (or reads inductor's on-disk cache)
            first = time.perf_counter() - t0
            s_c, s_o = timed([step_c, our_step(ours, opt_o, x, y)], device, args.repeats)
            compiled_steps.append((name, first, *row("", x.numel(), s_c, s_o)[1:]))
        del fused, opt_c

    M.merge_lora(ours)
    theirs = theirs.merge_and_unload()
    ours.eval(), theirs.eval()
    questions = ["What is the capital of France?", "Write a short poem about the sea.",
                 "How do I bake bread?", "Explain photosynthesis in one sentence."]
    gen_batch = args.gen_batch or args.batch
    prompts = (questions * gen_batch)[:gen_batch]
    enc = [tok.encode_prompt(q) for q in prompts]
    L = max(map(len, enc))
    hf_ids = torch.tensor([[tok.pad_id] * (L - len(e)) + e for e in enc], device=device)
    hf_mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc], device=device)
    n = args.new_tokens * len(prompts)  # equal work: eos is switched off on both sides

    plain = copy.deepcopy(ours)  # the same weights without pack_linears, for the packing's own gain
    fp32 = copy.deepcopy(ours).float() if dtype != torch.float32 else None  # the float32 rate on the same weights
    fast.pack_linears(ours, rows=len(prompts))  # as evaluation runs it (a no-op off a bf16 CPU)

    def gen_ours(model=ours):
        with torch.no_grad():
            M.generate_ids(model, enc, args.new_tokens, eos_id=-1, pad_id=tok.pad_id)

    def gen_theirs():
        with torch.no_grad():
            theirs.generate(input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            eos_token_id=None, pad_token_id=tok.pad_id)

    gens = [gen_ours, gen_theirs, lambda: gen_ours(plain)] + ([lambda: gen_ours(fp32)] if fp32 else [])
    g_o, g_t, g_p, *g_f = timed(gens, device, max(1, args.repeats // 2))
    rows.append(row(f"greedy generation, {len(prompts)} x {args.new_tokens} (tok/s)", n, g_o, g_t))
    unpacked = row("", n, g_o, g_p)
    in_fp32 = row("", n, g_o, g_f[0]) if g_f else None
    compiled = None
    if args.compile:  # the static-shape step compiled by inductor (on the unpacked weights: it packs its own)
        gen_compiled = lambda: fast.generate_static(plain, enc, args.new_tokens, -1, tok.pad_id, compile=True)
        t0 = time.perf_counter()
        gen_compiled()
        first = time.perf_counter() - t0
        g_c, g_o2 = timed([gen_compiled, gen_ours], device, max(1, args.repeats // 2))
        compiled = (first, *row("", n, g_c, g_o2)[1:])

    name = device_name(device, dtype)
    lines = [f"{args.model}, batch {args.batch}, seq {args.seq}, {args.new_tokens} new tokens, device {name} "
             f"({processor(device)}, {torch.get_num_threads()} threads), "
             f"{args.repeats} rounds, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}", "",
             "| measure | ours | transformers+peft | ours / theirs (speed) | ratio min-max over rounds |",
             "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f}x | {r[4]} |" for r in rows]
    lines += ["", f"Our generation without fast.pack_linears: {unpacked[2]:.2f} tok/s (packed / unpacked "
              f"{unpacked[3]:.2f}x, {unpacked[4]} over rounds)."]
    if in_fp32:
        lines += [f"Our generation in float32 (the same weights, unpacked): {in_fp32[2]:.2f} tok/s (packed bf16 / "
                  f"float32 {in_fp32[3]:.2f}x, {in_fp32[4]} over rounds)."]
    if compiled:
        lines += [f"Compiled static-shape decode (fast.generate_static, compile=True): {compiled[1]:.2f} tok/s after "
                  f"a first call of {compiled[0]:.1f} s (the compile), against packed eager {compiled[2]:.2f} in the "
                  f"same rounds ({compiled[3]:.2f}x, {compiled[4]} over rounds)."]
    if compiled_steps:
        lines += ["", "Our LoRA step with compiled blocks (fast.compile_blocks) against eager, in the same rounds:", "",
                  "| batch | first call (s) | compiled tok/s | eager tok/s | compiled / eager | min-max over rounds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {f:.1f} | {c:.2f} | {e:.2f} | {r:.2f}x | {mm} |" for n, f, c, e, r, mm in compiled_steps]
    cfg = ours.config  # the MLP's up projection over a batch's tokens: the model's largest matmul shape
    peak = matmul_rate(device, dtype, args.batch * args.seq, cfg.hidden_size, cfg.intermediate_size)
    lines += ["", f"Model FLOPs of a LoRA step (bench/speed.py lora_step_flops) against this machine's "
              f"{str(dtype).removeprefix('torch.')} matmul rate at the MLP shape ({args.batch * args.seq} x "
              f"{cfg.hidden_size} x {cfg.intermediate_size}): {peak / 1e12:.3f} TFLOP/s", "",
              "| LoRA step | model GFLOP | ours TFLOP/s | transformers+peft TFLOP/s | ours, share of the matmul rate |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {w / 1e9:.0f} | {o / 1e12:.3f} | {t / 1e12:.3f} | {o / peak:.0%} |" for n, w, o, t in flops]
    lines += [""] + matmul_table(cfg, device, dtype, args.batch * args.seq)
    lines += [""] + attention_table(cfg, device, dtype, args.batch)
    if device.type == "cuda":
        lines.append(f"\npeak CUDA memory (both models loaded): {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = results_file(device, dtype)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows, "unpacked_generation": unpacked[1:],
                                                    "fp32_generation": in_fp32[1:] if in_fp32 else None,
                                                    "compiled_generation": compiled,
                                                    "compiled_steps": compiled_steps,
                                                    "matmul_flops": peak,
                                                    "step_flops": flops}, indent=2))
    out.with_suffix(".md").write_text(text + f"\ncommand: python bench/speed.py {' '.join(sys.argv[1:])}\n")


if __name__ == "__main__":
    main()
