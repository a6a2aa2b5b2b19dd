"""What one LoRA training step needs in memory, and which setting makes it fit a device.

    python bench/memory.py --model llama2-7b --batch 10 --max-len 256 --devices 1 --device-gb 80
    python bench/memory.py --model /path/to/hf_folder_or_config.json --dtype bf16

The model is built on the meta device (shapes only: no weights are read, nothing is allocated),
the LoRA of the align stage added, and one training forward run under autograd's saved-tensor
hooks, which add up what the backward would keep (each tensor once). Components, per device:
- frozen weights at --dtype (FSDP: sharded over --devices, plus the largest block gathered);
- LoRA state: parameters, gradients and AdamW's two moments, all fp32;
- activations: the saved tensors of a forward at the per-device batch (batch / devices), the
  LM head over every position (an upper bound: training runs it on response tokens only); with
  gradient checkpointing, each block's input plus one block's saved tensors.
Then the first of plain / checkpointing / FSDP / FSDP + checkpointing that fits in --device-gb
(with --headroom for the allocator and transient buffers). An estimate of our code's footprint on
the meta device: the attention backend there may save more than a fused kernel would.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402

GiB = 2 ** 30
SHAPES = {  # config.json of the papers' models, for planning without their weights
    "llama2-7b": dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, max_position_embeddings=4096),
    "qwen2-7b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, rope_theta=1000000.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_config(spec: str) -> M.ModelConfig:
    if spec in SHAPES:
        return M.ModelConfig.from_hf(SHAPES[spec], spec)
    path = Path(spec)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"memory.py: error: {spec}: not a built-in shape ({', '.join(SHAPES)}), an HF folder "
                         "or a config.json")
    return M.ModelConfig.from_hf(json.loads(file.read_text()), str(file))


def plan(cfg: M.ModelConfig, batch: int, max_len: int, dtype=torch.bfloat16, rank: int = 8,
         devices: int = 1) -> dict:
    """Bytes per device of each component (see the module docstring)."""
    with torch.device("meta"):
        model = M.Transformer(cfg).to(dtype)
        M.add_lora(model, rank, 2 * rank)
        model.to(dtype)  # one dtype on meta; the LoRA state is counted in fp32 below
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    block = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    saved, kept = 0, {id(p): p for p in model.parameters()}  # weights are counted above, not as activations

    def pack(t):
        nonlocal saved
        base = t._base if t._base is not None else t
        if id(base) not in kept:  # a tensor saved by several ops is kept once
            kept[id(base)] = base
            saved += base.numel() * base.element_size()
        return t
    per_device = max(1, -(-batch // devices))
    ids = torch.zeros(per_device, max_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
    block_inputs = cfg.num_hidden_layers * per_device * max_len * cfg.hidden_size * torch.finfo(dtype).bits // 8
    return dict(weights=frozen, weights_fsdp=frozen / devices + block, lora_state=lora * 16,
                activations=saved, activations_checkpointed=block_inputs + saved / cfg.num_hidden_layers,
                lora_parameters=lora, batch_per_device=per_device)


def advice(p: dict, device_bytes: float) -> list[tuple[str, float, bool]]:
    """(setting, bytes per device, fits) for each way to run the step, cheapest in speed first."""
    rows = [("plain", p["weights"] + p["lora_state"] + p["activations"]),
            ("gradient checkpointing", p["weights"] + p["lora_state"] + p["activations_checkpointed"]),
            ("FSDP", p["weights_fsdp"] + p["lora_state"] + p["activations"]),
            ("FSDP + gradient checkpointing", p["weights_fsdp"] + p["lora_state"] + p["activations_checkpointed"])]
    return [(name, b, b <= device_bytes) for name, b in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b", help=f"{', '.join(SHAPES)}, an HF folder or a config.json")
    ap.add_argument("--batch", type=int, default=10, help="samples per optimizer micro-batch (all devices)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16", help="of the frozen weights and activations")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (all projections)")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--device-gb", type=float, default=80.0, help="memory of one device, GiB")
    ap.add_argument("--headroom", type=float, default=0.9, help="usable share of the device memory")
    args = ap.parse_args(argv)
    cfg = read_config(args.model)
    p = plan(cfg, args.batch, args.max_len, DTYPES[args.dtype], args.rank, args.devices)
    usable = args.device_gb * GiB * args.headroom
    print(f"{args.model}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; batch {args.batch} "
          f"({p['batch_per_device']} a device) x {args.max_len} tokens, {args.dtype}, LoRA r={args.rank} "
          f"({p['lora_parameters'] / 1e6:.1f} M parameters), {args.devices} device(s) of {args.device_gb:g} GiB")
    print("| component (per device) | GiB |\n|---|---|")
    for key in ("weights", "weights_fsdp", "lora_state", "activations", "activations_checkpointed"):
        print(f"| {key} | {p[key] / GiB:.2f} |")
    print("\n| setting | GiB per device | fits |\n|---|---|---|")
    rows = advice(p, usable)
    for name, b, fits in rows:
        print(f"| {name} | {b / GiB:.2f} | {'yes' if fits else 'no'} |")
    first = next((name for name, _, fits in rows if fits), None)
    print(f"\nrun with: {first}" if first else "\nno setting fits: more devices, a smaller batch or --max-len")
    return p, rows


if __name__ == "__main__":
    main()
