"""Hugging Face folders in and out: models (config.json, safetensors weights, tokenizer files)
and LoRA adapters in PEFT's layout, each read with every name and shape checked.

Our parameter names are HF's `LlamaForCausalLM` names without the leading `model.` (`hf_name`),
so a checkpoint maps one to one onto model.Transformer, and an adapter onto model.add_lora's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import model as M
from files import atomic_dir, read_json
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- models

def hf_name(name: str) -> str:
    """Our parameter name -> the HF checkpoint name (`layers.0...` -> `model.layers.0...`)."""
    return name if name.split(".")[0] in ("lm_head", "score") else "model." + name


def read_config(path: Path) -> M.ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; an HF model folder needs one")
    return M.ModelConfig.from_hf(read_json(file), str(file))


def safetensors_files(path: Path) -> list[Path]:
    """`model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # truncated or not a safetensors file
        raise ValueError(f"{file}: cannot read safetensors ({e})") from None


def load_state(model: nn.Module, path: Path, device, dtype):
    """Stream every checkpoint tensor into the (meta-device) model, checking names and shapes.

    Each tensor is read, cast and moved on its own, so no second full copy is ever in memory."""
    expected = {hf_name(k): v.shape for k, v in model.state_dict().items()}
    ours = {hf_name(k): k for k in model.state_dict()}
    loaded, unexpected, mismatched = {}, [], []
    for file in safetensors_files(path):
        f = open_safetensors(file)
        for key in f.keys():
            if key not in expected:
                if not (key == "lm_head.weight" and model.config.tie_word_embeddings) \
                        and not key.endswith("rotary_emb.inv_freq"):
                    unexpected.append(key)
                continue
            t = f.get_slice(key)
            if tuple(t.get_shape()) != tuple(expected[key]):
                mismatched.append(f"{key}: checkpoint {tuple(t.get_shape())}, model {tuple(expected[key])}")
                continue
            loaded[ours[key]] = f.get_tensor(key).to(device=device, dtype=dtype)
    present = {hf_name(k) for k in loaded} | {m.split(":")[0] for m in mismatched}  # mis-shaped is not missing
    missing = sorted(set(expected) - present)
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: checkpoint does not match config.json: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}, mis-shaped {mismatched[:8]}")
    model.load_state_dict(loaded, assign=True)


def load_pretrained(path: str | Path, device=None, dtype=None):
    """(model, tokenizer) from an HF folder (built-in names: `default_weights.load_pretrained`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json); built-in names such as "
                                "smollm2-135m-instruct are loaded by default_weights.load_pretrained")
    device = torch.device(device) if device else M.default_device()
    if dtype is None:  # bf16 on a GPU that has it, fp32 elsewhere (training asks fast.train_dtype)
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    cfg = read_config(path)
    tokenizer = Tokenizer.from_dir(path, cfg)
    with torch.device("meta"):
        model = M.Transformer(cfg)
    load_state(model, path, device, dtype)
    model.inv_freq = M.rope_inv_freq(cfg, device)
    model.name_or_path = str(path)
    return model.eval(), tokenizer


def save_pretrained(model: M.Transformer, tokenizer: Tokenizer, out):
    """Write an HF folder (config.json, model.safetensors, tokenizer files) `transformers` loads."""
    if M.lora_modules(model):
        raise ValueError("merge_lora(model) before save_pretrained (or save the adapter with save_lora)")
    state = {hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = dict(model.config.to_hf(), torch_dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."))
    with atomic_dir(out) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(tmp)


# ----------------------------------------------------------------------------- LoRA adapters

def peft_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' weights under PEFT's names (`base_model.model.<HF name>.lora_A.weight`)."""
    return {f"base_model.model.{hf_name(name)}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight
            for name, m in M.lora_modules(model).items() for ab in "AB"}


def save_lora(model: nn.Module, out):
    """Adapters in PEFT's layout: adapter_model.safetensors + adapter_config.json."""
    if not M.lora_modules(model):
        raise ValueError("the model has no LoRA adapters to save")
    state = {k: p.detach().contiguous().cpu() for k, p in peft_state(model).items()}
    conf = dict(peft_type="LORA", task_type="CAUSAL_LM", bias="none", fan_in_fan_out=False,
                inference_mode=True, init_lora_weights=True, use_rslora=False,
                base_model_name_or_path=getattr(model, "name_or_path", None), **model.lora_config)
    with atomic_dir(out) as tmp:
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))


def load_lora(model: nn.Module, path):
    """Add adapters from a PEFT folder (ours or `peft`'s) to the model; every key and shape is checked."""
    path = Path(path)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f}: missing; a LoRA folder holds adapter_config.json "
                                    "and adapter_model.safetensors")
    conf = read_json(path / "adapter_config.json")
    targets = conf["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    if not M.lora_modules(model):
        M.add_lora(model, conf["r"], conf["lora_alpha"], targets, conf.get("lora_dropout", 0.0))
    want = peft_state(model)
    with open_safetensors(path / "adapter_model.safetensors") as f:
        keys = {k.replace(".default.", ".") for k in f.keys()}
        bad = sorted(keys ^ set(want))
        if bad:
            raise ValueError(f"{path}: adapter does not fit this model (keys {bad[:6]}...): "
                             "a LoRA for another model or other targets?")
        with torch.no_grad():
            for k in f.keys():
                t, p = f.get_tensor(k), want[k.replace(".default.", ".")]
                if t.shape != p.shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(p.shape)}: a LoRA for another model?")
                p.copy_(t)
    return model
