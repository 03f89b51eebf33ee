"""Tokenizer and chat template, built from a GGUF's metadata or a HF directory's files.

Both paths end in a `tokenizers.Tokenizer` (the Rust library transformers wraps), so
encoding matches transformers' tokenizer for the same files token for token.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .errors import ModelLoadError

# llama.cpp's pre-tokenizer names whose split regex differs from GPT-2's default.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_GGUF_TOKEN_TYPE_CONTROL = 3
_GGUF_TOKEN_TYPE_USER_DEFINED = 4


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class ChatTemplate:
    """A Jinja chat template rendered the way transformers renders it."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.source = source
        # Whether it renders tool definitions itself (reads `tools`, as tool-calling models' templates do).
        self.knows_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **extra)


def _raise_template_error(message: str):
    raise jinja2.exceptions.TemplateError(message)


class RopewayTokenizer:
    """Encode, decode, chat template and the token ids that end a generation."""

    def __init__(self, tokenizer: Tokenizer, *, bos_token_id: int | None, eos_token_ids: list[int],
                 add_bos: bool, chat_template: str | None):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.add_bos = add_bos
        bos = tokenizer.id_to_token(bos_token_id) if bos_token_id is not None else None
        eos = tokenizer.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        self.chat_template = ChatTemplate(chat_template, bos, eos) if chat_template else None
        # Each token's text once decoded: logprobs name ~k+1 tokens per sampled token, every step.
        self._token_texts: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_text(self, token_id: int) -> str:
        """Readable text of one token (for logprobs), bytes that are not UTF-8 kept as escapes."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        extra = {"tools": tools} if tools else {}
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        # The template writes any BOS itself, as transformers' apply_chat_template assumes.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False)


def tokenizer_from_gguf(metadata: dict) -> RopewayTokenizer:
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "load the model's Hugging Face directory instead"
        )
    alphabet = set(byte_level_alphabet().values())
    spelling = byte_level_alphabet()
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {}
    for index, token in enumerate(tokens):
        # A few files store a token in plain UTF-8 rather than the byte alphabet.
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, index)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == _GGUF_TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == _GGUF_TOKEN_TYPE_USER_DEFINED and t in vocab]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        eos_ids.append(eot)
    return RopewayTokenizer(
        tokenizer,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def tokenizer_from_hf_dir(directory: Path, config: dict) -> RopewayTokenizer:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelLoadError(f"{directory} has no tokenizer.json (a fast tokenizer is required)")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:
        raise ModelLoadError(f"{tokenizer_file} is not a valid tokenizer.json: {error}") from error
    tokenizer_config = _read_json(directory / "tokenizer_config.json") or {}
    chat_template = tokenizer_config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: take the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    template_file = directory / "chat_template.jinja"
    if chat_template is None and template_file.is_file():
        chat_template = template_file.read_text()

    def token_id(value) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return tokenizer.token_to_id(value) if isinstance(value, str) else None

    bos_id = token_id(tokenizer_config.get("bos_token"))
    if bos_id is None:
        bos_id = config.get("bos_token_id")
    eos_ids = []
    generation = _read_json(directory / "generation_config.json") or {}
    for source in (generation.get("eos_token_id"), config.get("eos_token_id")):
        eos_ids += source if isinstance(source, list) else ([source] if source is not None else [])
    eos_from_config = token_id(tokenizer_config.get("eos_token"))
    if eos_from_config is not None:
        eos_ids.append(eos_from_config)
    # tokenizer.json's post-processor adds BOS where the model wants it; add_bos_token only
    # matters for older tokenizer.json files that lack that post-processor.
    add_bos = bool(tokenizer_config.get("add_bos_token", False)) and _post_processor_adds_nothing(tokenizer)
    return RopewayTokenizer(tokenizer, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos=add_bos,
                            chat_template=chat_template)


def _post_processor_adds_nothing(tokenizer: Tokenizer) -> bool:
    return len(tokenizer.encode("a", add_special_tokens=True).ids) == len(
        tokenizer.encode("a", add_special_tokens=False).ids)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}") from error
