"""model.py, hf.py and fast.py against transformers/peft on tiny random models: logits, loading, LoRA,
generation, and the speed paths against the plain ones."""
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer, tiny_config

import default_weights
import fast
import hf
import model as M
import tokenizer as T

transformers = pytest.importorskip("transformers")

VARIANTS = [  # (architecture, tied head, qkv bias)
    ("LlamaForCausalLM", True, False),
    ("LlamaForCausalLM", False, False),
    ("Qwen2ForCausalLM", False, True),
    ("MistralForCausalLM", True, False),
]


def hf_model(arch, tied, bias):
    cfg = tiny_config(tie_word_embeddings=tied, attention_bias=bias, architecture=arch).to_hf()
    cfg.pop("architectures"); cfg["sliding_window"] = None
    cls = getattr(transformers, arch)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**cfg)
    if arch == "LlamaForCausalLM":
        config.attention_bias = bias
    torch.manual_seed(0)
    m = cls(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.08)
    return m


IDS = torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch,tied,bias", VARIANTS)
def test_logits_match_transformers_both_ways(tmp_path, arch, tied, bias):
    ref = hf_model(arch, tied, bias)
    ref.save_pretrained(tmp_path / "hf")
    make_tokenizer().save(tmp_path / "hf")
    ours, _ = hf.load_pretrained(tmp_path / "hf", device="cpu")
    with torch.no_grad():
        want = ref(IDS).logits
        assert (ours(IDS) - want).abs().max() <= 1e-4
        hf.save_pretrained(ours, make_tokenizer(), tmp_path / "ours")
        back = getattr(transformers, arch).from_pretrained(tmp_path / "ours").eval()
        assert (back(IDS).logits - want).abs().max() <= 1e-4


def gemma2(**kw):
    """A tiny random Gemma-2 whose soft caps bind (scores and logits reach the caps), with a
    sliding window shorter than the inputs and a query scale other than 1/sqrt(head_dim)."""
    cfg = transformers.Gemma2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                                    final_logit_softcapping=1.5, sliding_window=4, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_gemma2_logits_match_transformers_both_ways(tmp_path):
    ref = gemma2()
    ref.save_pretrained(tmp_path / "hf")
    make_tokenizer().save(tmp_path / "hf")
    ours, _ = hf.load_pretrained(tmp_path / "hf", device="cpu")
    assert ours.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        want = ref(IDS).logits
        assert want.abs().max() > 1.0  # the final cap (1.5) binds
        assert (ours(IDS) - want).abs().max() <= 1e-4
        padded = ref(IDS, attention_mask=mask).logits
        got = ours(IDS, mask.bool())
        assert (got[0] - padded[0]).abs().max() <= 1e-4 and (got[1, 3:] - padded[1, 3:]).abs().max() <= 1e-4
        hf.save_pretrained(ours, make_tokenizer(), tmp_path / "ours")
        back = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
        back.config._attn_implementation = "eager"
        assert (back(IDS).logits - want).abs().max() <= 1e-4


def test_gemma2_generation_with_the_cache_matches_the_plain_loop(tmp_path):
    ref = gemma2()
    ref.save_pretrained(tmp_path / "hf")
    make_tokenizer().save(tmp_path / "hf")
    ours, tok = hf.load_pretrained(tmp_path / "hf", device="cpu")
    enc = [tok.encode_prompt(p) for p in ["hi", "What is the capital of France?"]]
    with torch.no_grad():
        want = [argmax_loop(ours, e, 8, -1) for e in enc]  # past the window of 4: the cache must slide
        assert M.generate_ids(ours, enc, 8, -1, tok.pad_id) == want


def test_unsupported_activation_is_an_error(tmp_path, tiny_dir):
    conf = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps(dict(conf, hidden_act="relu")))
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        hf.load_pretrained(tiny_dir, device="cpu")


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    cfg = tiny_config(rope_scaling=scaling, rope_theta=500000.0).to_hf()
    cfg.pop("architectures")
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    ref.save_pretrained(tmp_path)
    make_tokenizer().save(tmp_path)
    ours, _ = hf.load_pretrained(tmp_path, device="cpu")
    ids = torch.randint(3, 400, (1, 40))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_model("LlamaForCausalLM", False, False)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    make_tokenizer().save(tmp_path)
    ours, _ = hf.load_pretrained(tmp_path, device="cpu")
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max() <= 1e-4


def test_loading_errors_name_the_file(tiny_dir, tmp_path):
    (tiny_dir / "tokenizer.json").rename(tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        hf.load_pretrained(tiny_dir, device="cpu")
    (tmp_path / "t.json").rename(tiny_dir / "tokenizer.json")

    conf = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps(dict(conf, hidden_size=32)))
    with pytest.raises(ValueError, match="mis-shaped.*embed_tokens") as e:
        hf.load_pretrained(tiny_dir, device="cpu")
    assert "missing []" in str(e.value)  # a tensor of the wrong shape is there, not missing
    (tiny_dir / "config.json").write_text(json.dumps(dict(conf, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        hf.load_pretrained(tiny_dir, device="cpu")
    (tiny_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tiny_dir, device="cpu")


def test_truncated_safetensors_is_an_error(tiny_dir):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        hf.load_pretrained(tiny_dir, device="cpu")


def test_unknown_prompt_format():
    with pytest.raises(ValueError, match="unknown prompt format 'vicuna'"):
        make_tokenizer("vicuna")


@pytest.mark.parametrize("fmt", T.PROMPT_FORMATS)
def test_tokenizer_round_trip_and_prompt_mask(fmt):
    tok = make_tokenizer(fmt)
    text = "Sure, here is how: step 1"
    assert tok.decode(tok.encode(text)) == text
    ids, n = tok.encode_example("How do I bake bread?", text, input="at home" if fmt == "alpaca" else None)
    assert ids[n:-1] == tok.encode(text) and ids[-1] == tok.eos_id
    assert tok.decode(ids[:n]).strip().endswith({"chatml": "assistant", "llama2": "[/INST]",
                                                  "alpaca": "### Response:"}[fmt])


def test_lora_identity_at_init_and_merge_after_training():
    m = make_model()
    with torch.no_grad():
        base = m(IDS)
    M.add_lora(m, rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(m(IDS), base)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.shape[0] == 4 or p.shape[1] == 4 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        m(IDS).logsumexp(-1).mean().backward()
        opt.step(); opt.zero_grad()
    with torch.no_grad():
        trained = m(IDS)
        assert (trained - base).abs().max() > 1e-3
        M.merge_lora(m)
        assert not M.lora_modules(m)
        assert (m(IDS) - trained).abs().max() <= 1e-4


def test_lora_runs_in_the_dtype_of_its_layer():
    """Over bf16 frozen weights the float32 adapter computes in bf16 and returns bf16 (its weights
    are cast, not the activations); its gradients reach the float32 parameters."""
    torch.manual_seed(0)
    lora = M.LoRALinear(torch.nn.Linear(16, 32, bias=False).bfloat16(), rank=4, alpha=8)
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16 and lora.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert lora.lora_A.weight.grad.dtype == lora.lora_B.weight.grad.dtype == torch.float32
    want = x.float() @ lora.base.weight.float().T + 2 * (x.float() @ lora.lora_A.weight.T) @ lora.lora_B.weight.T
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("faster", [True, False])
def test_cpu_bf16_follows_the_bf16_timing(monkeypatch, faster):
    """On a CPU, `bf16` asks for bf16 weights, and gets them only where a bf16 matmul was timed
    faster than fp32 (plain AVX-512 emulates bf16 at a fraction of the fp32 speed)."""
    monkeypatch.setattr(fast, "_cpu_bf16_faster", lambda: faster)
    assert fast.train_dtype("cpu", True) == (torch.bfloat16 if faster else torch.float32)
    assert fast.train_dtype("cpu", False) == torch.float32
    assert fast.bf16_supported("cpu") is faster and fast.bf16_supported("meta") is False


def test_bf16_cpu_training_attention_matches_the_bf16_kernel():
    """`attend` runs a bf16 training pass in float32 on a CPU (the bf16 flash backward is slow):
    output and gradients agree with the bf16 kernel's within bf16 rounding, and stay bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    y = M.attend(q, k, v, None, None, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0.02, atol=0.02)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_cpu_bf16_timing_answers_once():
    assert fast._cpu_bf16_faster() in (True, False)
    assert fast._cpu_bf16_faster.cache_info().currsize == 1


def test_lora_round_trip_with_peft(tmp_path, tiny_dir):
    peft = pytest.importorskip("peft")
    m, tok = hf.load_pretrained(tiny_dir, device="cpu")
    M.add_lora(m, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for lora in M.lora_modules(m).values():
            lora.lora_B.weight.normal_(0, 0.1)
        ours = m(IDS)
    hf.save_lora(m, tmp_path / "adapter")
    modes = {f.name: f.stat().st_mode & 0o777 for f in [tmp_path / "adapter", *(tmp_path / "adapter").iterdir()]}
    assert modes == {"adapter": 0o755, "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (ref(IDS).logits - ours).abs().max() <= 1e-4
    ref.save_pretrained(tmp_path / "peft_saved")  # and back: peft's own file into our model
    fresh, _ = hf.load_pretrained(tiny_dir, device="cpu")
    hf.load_lora(fresh, tmp_path / "peft_saved")
    with torch.no_grad():
        assert (fresh(IDS) - ours).abs().max() <= 1e-5


def test_load_lora_refuses_another_model(tmp_path):
    m = make_model()
    M.add_lora(m, rank=4, alpha=8)
    hf.save_lora(m, tmp_path / "a")
    other = make_model(hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="another model"):
        hf.load_lora(other, tmp_path / "a")


def test_damaged_files_are_errors_that_name_them(tmp_path, tiny_dir):
    m = make_model()
    M.add_lora(m, rank=4, alpha=8)
    hf.save_lora(m, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read"):
        hf.load_lora(make_model(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        hf.load_lora(make_model(), tmp_path / "a")
    (tiny_dir / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        hf.load_pretrained(tiny_dir, device="cpu")


def argmax_loop(model, ids, n, eos):
    """The reference: no cache, no padding, argmax one token at a time."""
    out = []
    for _ in range(n):
        nxt = model(torch.tensor([ids + out]))[0, -1].argmax().item()
        if nxt == eos:
            break
        out.append(nxt)
    return out


def test_generation_cache_and_batching_match_plain_loop():
    m, tok = make_model(), make_tokenizer()
    prompts = ["hi", "What is the capital of France?", "How do I bake bread at home today?"]
    enc = [tok.encode_prompt(p) for p in prompts]
    with torch.no_grad():
        want = [argmax_loop(m, e, 12, tok.eos_id) for e in enc]
        batched = M.generate_ids(m, enc, 12, tok.eos_id, tok.pad_id)
        single = [M.generate_ids(m, [e], 12, tok.eos_id, tok.pad_id)[0] for e in enc]
    assert batched == want and single == want
    assert M.generate(m, tok, prompts, 12, batch_size=2) == [tok.decode(w) for w in want]


def test_finished_rows_leave_the_batch():
    """A row that reaches eos early leaves the batch and its cache; the others decode on unchanged,
    whatever the batch and token budget."""
    m, tok = make_model(), make_tokenizer()
    prompts = ["hi", "What is the capital of France?", "How do I bake bread at home today?", "ok"]
    enc = [tok.encode_prompt(p) for p in prompts]
    with torch.no_grad():
        free = [argmax_loop(m, e, 12, -1) for e in enc]
        j = next(j for j in range(1, 12) if free[0][j] not in free[0][:j])
        eos = free[0][j]  # the first row stops after j tokens
        want = [argmax_loop(m, e, 12, eos) for e in enc]
        assert len(want[0]) == j and max(map(len, want)) > j  # rows finish at different steps
        assert M.generate_ids(m, enc, 12, eos, tok.pad_id) == want
    tok.eos_id = eos
    for batch_size, max_tokens in ((4, 4096), (3, 4096), (4, 2 * max(map(len, enc)))):
        got = M.generate(m, tok, prompts, 12, batch_size=batch_size, max_tokens=max_tokens)
        assert got == [tok.decode(w) for w in want], (batch_size, max_tokens)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("tie", [True, False])
def test_packed_linears_give_the_same_logits_and_answers(tie):
    """pack_linears (oneDNN's blocked weight layout, for bf16 inference on a CPU) changes where the
    weights live, not what the model computes: the same logits and the same greedy answers."""
    m, tok = make_model(tie_word_embeddings=tie), make_tokenizer()
    m = m.to(torch.bfloat16).eval()
    prompts = ["hi", "What is the capital of France?", "How do I bake bread at home today?"]
    ids = torch.tensor([tok.encode_prompt(prompts[2])])
    with torch.no_grad():
        want_logits, want = m(ids).float(), M.generate(m, tok, prompts, 10)
        packed = fast.pack_linears(m, rows=3)
        assert packed is m and isinstance(m.layers[0].mlp.up_proj, fast.PackedLinear)
        assert isinstance(m.lm_head, fast.PackedLinear)
        torch.testing.assert_close(m(ids).float(), want_logits, rtol=0, atol=1e-2)
        assert M.generate(m, tok, prompts, 10) == want
    fp32, lora = make_model(), make_model()
    assert fast.pack_linears(fp32) is fp32 and not any(isinstance(x, fast.PackedLinear) for x in fp32.modules())
    M.add_lora(lora.to(torch.bfloat16), 4, 8, M.LORA_TARGETS)
    with pytest.raises(ValueError, match="merge"):
        fast.pack_linears(lora)


def test_generation_matches_transformers_generate(tiny_dir):
    m, tok = hf.load_pretrained(tiny_dir, device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    enc = [tok.encode_prompt(p) for p in ["hi", "What is the capital of France?"]]
    L = max(map(len, enc))
    ids = torch.tensor([[tok.pad_id] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[:, L:].tolist()
    want = [o[:o.index(tok.eos_id)] if tok.eos_id in o else o for o in out]
    assert M.generate_ids(m, enc, 10, tok.eos_id, tok.pad_id) == want


def test_sampling_is_seeded():
    m, tok = make_model(), make_tokenizer()
    a = M.generate(m, tok, ["hi"], 8, temperature=1.0, top_p=0.9, seed=3)
    assert a == M.generate(m, tok, ["hi"], 8, temperature=1.0, top_p=0.9, seed=3)


@pytest.mark.real_model
def test_default_model_knows_paris():
    m, tok = default_weights.load_pretrained("smollm2-135m-instruct", device="cpu")
    assert "Paris" in M.generate(m, tok, ["What is the capital of France?"], 20)[0]


def test_tiny_random_tokenizer_is_the_same_in_every_process(tmp_path):
    """The tiny preset's ids do not depend on the process: ByteLevel.alphabet() comes back in a
    different order each time, so the vocabulary is built from it sorted (two processes agree)."""
    import subprocess
    import sys
    code = ("import sys, json; sys.path.insert(0, {root!r}); import default_weights as W; "
            "W.save_tiny_random({out!r}); t = json.load(open({out!r} + '/tokenizer.json')); "
            "print(json.dumps(t['model']['vocab'], sort_keys=False))")
    vocabs = [subprocess.run([sys.executable, "-c", code.format(root=str(Path(__file__).resolve().parents[1]),
                                                                out=str(tmp_path / f"t{i}"))],
                             capture_output=True, text=True, check=True).stdout for i in range(2)]
    assert vocabs[0] == vocabs[1]


def test_a_killed_writer_leaves_no_temporary_folder_behind(tmp_path):
    """SIGKILL cannot be caught: the next save of the same folder removes what a dead writer left."""
    import subprocess
    import sys as _sys
    dead = subprocess.run([_sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = tmp_path / f".adapter.{dead}.abc123"
    orphan.mkdir()
    (orphan / "adapter_model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".adapter.{os.getpid()}.xyz"  # a live writer's folder stays
    alive.mkdir()
    m = make_model()
    M.add_lora(m, rank=4, alpha=8)
    hf.save_lora(m, tmp_path / "adapter")
    assert not orphan.exists() and alive.exists() and (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("kw", [{}, dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)])
def test_static_decode_matches_the_dynamic_one(kw):
    """generate_static (the whole cache every step, finished rows kept, prompts padded to a bucket)
    decodes what generate_ids does, rows stopping at eos at different steps included."""
    m, tok = make_model(**kw), make_tokenizer()
    prompts = ["hi", "What is the capital of France?", "How do I bake bread at home today?", "ok"]
    enc = [tok.encode_prompt(p) for p in prompts]
    free = M.generate_ids(m, enc, 12, -1, tok.pad_id)
    eos = next(t for row in free for j, t in enumerate(row) if j and t not in row[:j])  # a row stops early
    want = M.generate_ids(m, enc, 12, eos, tok.pad_id)
    assert len({len(w) for w in want}) > 1
    for bucket in (1, 32):
        assert fast.generate_static(m, enc, 12, eos, tok.pad_id, bucket=bucket) == want


def test_compiled_decode_step_generates_what_eager_does():
    m, tok = make_model(), make_tokenizer()
    prompts = ["hi", "What is the capital of France?", "How do I bake bread at home today?"]
    assert M.generate(m, tok, prompts, 8, decode=fast.generate_compiled) == M.generate(m, tok, prompts, 8)
