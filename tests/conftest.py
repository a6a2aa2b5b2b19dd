"""Tiny random models and a tiny tokenizer, so the suite runs in minutes on 2 CPU cores."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

import hf  # noqa: E402
import model as M  # noqa: E402
import tokenizer as T  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give

CORPUS = [
    "The capital of France is Paris. How do I bake bread? I cannot help with that request.",
    "Sure, here is how: step 1, step 2, step 3. I'm sorry, but I can't assist with that.",
    "Analyze the sentiment of the input, and respond only positive or negative. positive negative",
    "Below is an instruction that describes a task. Write a response that appropriately completes",
    "### Instruction: ### Input: ### Response: user assistant system 0123456789 [INST] [/INST]",
] * 4


def make_tokenizer(prompt_format="chatml", extra=()) -> "T.Tokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()))
    tok.train_from_iterator(CORPUS + list(extra), trainer)
    return T.Tokenizer(tok, bos_id=0, eos_id=2, pad_id=0, prompt_format=prompt_format)


def tiny_config(**kw) -> "M.ModelConfig":
    base = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                bos_token_id=0, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return M.ModelConfig(**base)


def make_model(seed=0, **kw) -> "M.Transformer":
    torch.manual_seed(seed)
    model = M.Transformer(tiny_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def tiny_dir(tmp_path):
    """An HF folder holding a tiny random model and tokenizer, written by our save_pretrained."""
    out = tmp_path / "tiny"
    hf.save_pretrained(make_model(), make_tokenizer(), out)
    return out


def interrupt_selector_at(monkeypatch, step: int):
    """Ctrl-C inside a selector's loop when its meter reaches `step` steps (monkeypatch.undo() ends it)."""
    import pharmacist
    real = pharmacist.Meter.losses

    def interrupted(meter, *args, **kwargs):
        if meter.steps == step:
            raise KeyboardInterrupt
        return real(meter, *args, **kwargs)
    monkeypatch.setattr(pharmacist.Meter, "losses", interrupted)


def interrupt_at(monkeypatch, defense: str, step: int):
    """Make the defense's step raise Ctrl-C (KeyboardInterrupt) when the loop reaches `step`."""
    import defenses
    real = defenses.STEPS[defense]

    def interrupted(ctx, batch):
        if ctx.step == step:
            raise KeyboardInterrupt
        return real(ctx, batch)
    monkeypatch.setitem(defenses.STEPS, defense, interrupted)

