"""The checkpoint's tokenizer: a ``tokenizers.Tokenizer`` plus what the config files say around it.

``tokenizer.json`` is the source of truth for encoding and decoding (normalizer, pre-tokenizer,
model, post-processor, decoder). The JSON files beside it add the named special tokens, the chat
template and the generation defaults. Encoding and decoding match what transformers'
``AutoTokenizer`` does for a ``tokenizers``-backed checkpoint; chat templates render the way
transformers renders them (sandboxed jinja2, ``trim_blocks``, ``lstrip_blocks``, the same helpers).

transformers is never imported here: it is a test-only dependency.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from tureen.errors import ConfigError, InvalidRequestError, ModelLoadError

# The named special tokens transformers knows; their string values are chat-template variables.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# generation_config.json fields that become default sampling values (names as in SamplingParams).
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# Only WordPiece/Unigram decoders get transformers' "clean up tokenization spaces"; it corrupts BPE.
_CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Encode, decode and chat-format text for one checkpoint.

    ``skipped_special_ids``: the ids ``decode(..., skip_special_tokens=True)`` drops.
    ``byte_fallback_ids``: the ``<0xNN>`` byte pieces of a byte-fallback vocabulary (else empty).
    """

    def __init__(self, backend: BackendTokenizer, *, special_tokens: Mapping[str, AddedToken] | None = None,
                 extra_special_tokens: Sequence[AddedToken] = (), chat_templates: Mapping[str, str] | None = None,
                 generation_config: Mapping[str, Any] | None = None, clean_up_tokenization_spaces: bool = False):
        self._backend = backend
        self._special = dict(special_tokens or {})
        self._extra_special = list(extra_special_tokens)
        self._chat_templates = dict(chat_templates or {})
        self._generation_config = dict(generation_config or {})
        # Like transformers: every named or extra special token is registered as a special added
        # token (adding it to the vocabulary if the model lacks it), so skip_special_tokens drops it.
        backend.add_special_tokens(list(self._special.values()) + self._extra_special)
        # get_vocab_size(with_added_tokens=True) builds the whole vocabulary map: read it once.
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.skipped_special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.byte_fallback_ids = _byte_fallback_ids(backend)
        self._cleanup = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load from a checkpoint directory; ``chat_template`` overrides its template (file path or text)."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"no tokenizer.json in {str(directory)!r}; tureen needs a `tokenizers` "
                                 "serialization (tokenizer.json) next to the checkpoint")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception on malformed files
            raise ModelLoadError(f"cannot read {tokenizer_file}: {exc}") from exc
        config = _read_tokenizer_config(directory)
        special = {key: tok for key in _special_token_keys(config) if (tok := _added_token(config[key])) is not None}
        extra = [tok for value in _extra_special_values(config) if (tok := _added_token(value)) is not None]
        templates = _load_chat_templates(directory, config)
        if chat_template is not None:
            templates = {"default": _template_override(chat_template)}
        tokenizer = cls(backend, special_tokens=special, extra_special_tokens=extra, chat_templates=templates,
                        generation_config=_read_json(directory / "generation_config.json"),
                        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))
        tokenizer._add_missing_post_processor(config)
        return tokenizer

    def _add_missing_post_processor(self, config: Mapping[str, Any]) -> None:
        # A tokenizer.json post-processor already decides BOS/EOS (transformers 5 then ignores
        # add_bos_token/add_eos_token). Only when it has none do those config flags say what to add.
        if self._backend.post_processor is not None:
            return
        bos = self.bos_token if config.get("add_bos_token") else None
        eos = self.eos_token if config.get("add_eos_token") else None
        if bos is None and eos is None:
            return

        def sequence(name: str, type_id: int) -> str:
            pieces = (bos and f"{bos}:{type_id}", f"${name}:{type_id}", eos and f"{eos}:{type_id}")
            return " ".join(piece for piece in pieces if piece)

        used = [(token, self._backend.token_to_id(token)) for token in (bos, eos) if token]
        self._backend.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}", special_tokens=used)

    # ----------------------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids outside the vocabulary (a model's padded embedding rows) decode to nothing, as in transformers."""
        try:
            text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError) as exc:
            raise InvalidRequestError(f"token ids must be non-negative integers: {exc}", param="token_ids") from exc
        if self._cleanup:
            for old, new in _CLEANUP_REPLACEMENTS:
                text = text.replace(old, new)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    @cached_property
    def max_token_chars(self) -> int:
        """Most characters of text one token can cover: an upper bound for early length checks.

        A vocabulary entry's string is at least as long as the text it encodes (byte-level BPE spells
        each byte as one character; WordPiece and byte-fallback spellings are longer still), so a
        text longer than ``max_model_len * max_token_chars`` cannot fit, whatever it tokenizes to.
        """
        return max((len(t) for t in self._backend.get_vocab(with_added_tokens=True)), default=1) or 1

    # ----------------------------------------------------------------------------- special tokens

    def _special_str(self, key: str) -> str | None:
        token = self._special.get(key)
        return None if token is None else token.content

    @property
    def bos_token(self) -> str | None:
        return self._special_str("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_str("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        bos = self.bos_token
        if bos is not None:
            return self._backend.token_to_id(bos)
        value = self._generation_config.get("bos_token_id")
        return value if isinstance(value, int) else None

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config's EOS ids (int or list) followed by the tokenizer's EOS token, without repeats."""
        configured = self._generation_config.get("eos_token_id")
        ids = configured if isinstance(configured, list) else [configured]
        eos = self.eos_token
        ids = ids + [self._backend.token_to_id(eos) if eos is not None else None]
        return list(dict.fromkeys(i for i in ids if isinstance(i, int)))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as strings: the variables every chat template sees."""
        return {key: token.content for key, token in self._special.items()}

    @property
    def all_special_ids(self) -> list[int]:
        contents = [tok.content for tok in self._special.values()] + [tok.content for tok in self._extra_special]
        ids = (self._backend.token_to_id(content) for content in dict.fromkeys(contents))
        return [i for i in ids if i is not None]

    @property
    def generation_defaults(self) -> dict[str, float | int]:
        """Default sampling values from generation_config.json (only the fields it sets)."""
        cfg = self._generation_config
        return {key: cfg[key] for key in SAMPLING_DEFAULT_KEYS if isinstance(cfg.get(key), (int, float))}

    # ----------------------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the checkpoint has none."""
        return self._chat_templates.get("default")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render ``messages`` to a prompt string; ``kwargs`` become template variables.

        Encode the result with ``add_special_tokens=False``: the template writes its own BOS.
        """
        source = self._select_template(tools)
        template = _compile_template(source)
        chat = _normalize_messages(messages, keep_part_lists=_template_iterates_content(source))
        variables = {"documents": None, **self.special_tokens_map, **kwargs}
        try:
            return template.render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as exc:  # a template is code: raise_exception, `'a' + 1`, a missing key...
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc

    def _select_template(self, tools: list[dict] | None) -> str:
        if not self._chat_templates:
            raise InvalidRequestError(
                "this model has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja); pass one with --chat-template or send a plain completion prompt",
                param="messages")
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        names = sorted(self._chat_templates)
        raise InvalidRequestError(f"this model has several chat templates ({names}) and none named 'default'",
                                  param="messages")


def _byte_fallback_ids(backend: BackendTokenizer) -> frozenset[int]:
    """Ids of the ``<0xNN>`` pieces a byte-fallback model (SentencePiece style) spells unknown text with."""
    if not getattr(backend.model, "byte_fallback", False):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(i for i in ids if i is not None)


# --------------------------------------------------------------------------------- config files


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json filling the keys it lacks (legacy layout)."""
    config = _read_json(directory / "tokenizer_config.json")
    for key, value in _read_json(directory / "special_tokens_map.json").items():
        if config.get(key) is None:
            config[key] = value
    return config


def _special_token_keys(config: Mapping[str, Any]) -> list[str]:
    """The named tokens plus model-specific ``*_token`` entries (e.g. ``image_token``), as transformers."""
    extra = [key for key, value in config.items()
             if key.endswith("_token") and key not in SPECIAL_TOKEN_KEYS and isinstance(value, (str, dict))]
    return [key for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None] + extra


def _extra_special_values(config: Mapping[str, Any]) -> list[Any]:
    values = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    return list(values.values()) if isinstance(values, dict) else list(values)


def _added_token(value: Any) -> AddedToken | None:
    """A special token from a config value: a string or a serialized AddedToken dict."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **flags)
    return None


def _load_chat_templates(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; separate ``*.jinja`` files take priority over tokenizer_config.json, as in transformers."""
    templates: dict[str, str] = {}
    configured = config.get("chat_template")
    if isinstance(configured, str):
        templates["default"] = configured
    elif isinstance(configured, list):
        templates.update({t["name"]: t["template"] for t in configured if isinstance(t, dict)
                          and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)})
    files = {"default": directory / "chat_template.jinja"}
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        files.update({p.stem: p for p in sorted(extra_dir.glob("*.jinja"))})
    found = {name: p.read_text(encoding="utf-8") for name, p in files.items() if p.is_file()}
    return found if found else templates


def _template_override(value: str) -> str:
    """``--chat-template``: template text (it contains jinja delimiters) or a path to a file holding it."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"chat template {value!r} is neither a readable file nor jinja template text")
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------- chat templates


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendered as-is here."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, closing a sandbox escape (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick: `self` may be a kwarg
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which chat prompts must not see.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"the model's chat template does not compile: {exc}", param="messages") from exc


@lru_cache(maxsize=32)
def _template_iterates_content(source: str) -> bool:
    """Whether the template loops over ``message['content']`` (so it expects OpenAI-style part lists).

    Templates that do not are given each message's text parts joined into one string.
    """
    try:
        tree = _environment().parse(source)
    except jinja2.TemplateError:
        return False
    content_names = {node.target.name for node in tree.find_all(nodes.Assign)
                     if isinstance(node.target, nodes.Name) and _is_content_lookup(node.node)}
    return any(_is_content_lookup(loop.iter) or (isinstance(loop.iter, nodes.Name) and loop.iter.name in content_names)
               for loop in tree.find_all(nodes.For))


def _is_content_lookup(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"


def _normalize_messages(messages: Any, keep_part_lists: bool) -> list[dict[str, Any]]:
    """Validate messages and drop None-valued keys (OpenAI clients send ``content: null``), as transformers."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    chat = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{index}] must be an object with a string 'role'", param="messages")
        message = {key: value for key, value in message.items() if value is not None}
        content = message.get("content")
        if isinstance(content, list) and not keep_part_lists:
            message["content"] = _join_text_parts(content, index)
        elif content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"messages[{index}].content must be a string or a list of parts",
                                      param="messages")
        chat.append(message)
    return chat


def _join_text_parts(parts: list[Any], index: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(f"messages[{index}].content has a {kind!r} part; only text parts are supported",
                                      param="messages")
    return "\n".join(texts)
