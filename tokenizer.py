"""The tokenizer wrapper and the prompt formats: text to ids and back.

A thin layer over `tokenizers.Tokenizer` (HF's fast-tokenizer file): the special tokens, the
prompt format a model was tuned with (`chatml`, `llama2`, `alpaca`), and the training example
`[bos] prompt response eos`. hf.load_pretrained reads one from an HF folder beside the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

ALPACA_HEAD = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
PROMPT_FORMATS = ("chatml", "llama2", "alpaca")


def format_prompt(fmt: str, prompt: str, input: str | None = None) -> str:
    """The text before the response, in a named prompt format; the response follows directly."""
    if fmt == "alpaca":  # the template of Vaccine / Booster / T-Vaccine (Stanford Alpaca)
        if input:
            return (ALPACA_HEAD.format(", paired with an input that provides further context")
                    + f"### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n")
        return ALPACA_HEAD.format("") + f"### Instruction:\n{prompt}\n\n### Response:\n"
    user = f"{prompt}\n\n{input}" if input else prompt
    if fmt == "chatml":  # SmolLM2, Qwen
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if fmt == "llama2":  # Llama-2-chat; the bos token is added by the tokenizer
        return f"[INST] {user} [/INST] "
    raise ValueError(f"unknown prompt format {fmt!r} (known: {', '.join(PROMPT_FORMATS)})")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`: ids, special tokens and the prompt format."""

    def __init__(self, tok, bos_id=None, eos_id=None, pad_id=None, prompt_format="chatml",
                 config: dict | None = None):
        format_prompt(prompt_format, "")  # validates the name
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.prompt_format = prompt_format
        self.add_bos = bos_id is not None and prompt_format != "chatml"
        self.config = config or {}  # tokenizer_config.json, kept for save

    @classmethod
    def from_dir(cls, path, cfg=None, prompt_format: str | None = None):
        """From an HF folder's tokenizer.json and tokenizer_config.json; the special tokens the
        latter does not name come from `cfg` (a model.ModelConfig) where given."""
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json (the fast-tokenizer file is needed)")
        tok = HFTokenizer.from_file(str(file))
        conf_file = path / "tokenizer_config.json"
        conf = json.loads(conf_file.read_text()) if conf_file.is_file() else {}

        def special(key, fallback):
            value = conf.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            found = tok.token_to_id(value) if value else None
            return found if found is not None else fallback

        bos = special("bos_token", cfg.bos_token_id if cfg else None)
        eos = special("eos_token", cfg.eos_token_id if cfg else None)
        pad = special("pad_token", eos)
        fmt = prompt_format or conf.get("prompt_format") or (
            "chatml" if tok.token_to_id("<|im_start|>") is not None else "alpaca")
        return cls(tok, bos, eos, pad, fmt, conf)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def format_prompt(self, prompt: str, input: str | None = None) -> str:
        return format_prompt(self.prompt_format, prompt, input)

    def encode_prompt(self, prompt: str, input: str | None = None) -> list[int]:
        return self.encode(self.format_prompt(prompt, input), add_bos=self.add_bos)

    def encode_example(self, prompt: str, response: str, input: str | None = None):
        """(ids, n_prompt): [bos] prompt response eos; the first n_prompt ids are masked in training."""
        p = self.encode_prompt(prompt, input)
        return p + self.encode(response) + [self.eos_id], len(p)

    def save(self, out):
        out = Path(out)
        self.tok.save(str(out / "tokenizer.json"))
        conf = dict(self.config, prompt_format=self.prompt_format)
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                conf[key] = self.tok.id_to_token(i)
        (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
