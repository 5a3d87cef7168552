"""tureen.tokenizer.Tokenizer against transformers' AutoTokenizer on tokenizers built here.

Two families are trained locally: a byte-level BPE (GPT-2 / Llama-3 style, BOS from the
tokenizer.json post-processor) and a SentencePiece-style BPE with byte fallback (Metaspace
pre-tokenizer, Llama-2's decoder chain). CJK and emoji are absent from the training text, so the
second one must fall back to byte tokens for them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tureen.errors import ConfigError, InvalidRequestError, ModelLoadError
from tureen.tokenizer import Tokenizer

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "Continuous batching keeps the accelerator busy; paged attention keeps memory tidy.",
    "Un café au lait, s'il vous plaît. Déjà vu à la crème brûlée, naïve façade.",
    "Größe, Straße und Übermaß: äöü ß. Señor niño mañana. Hello, world! 1234 5678.",
    "def add(a, b):\n    return a + b  # indentation matters\n\tTabs too.",
]

# Text the tests encode: ASCII, accents (in the training text), CJK and emoji (only as bytes).
SAMPLE_TEXTS = [
    "Hello, world!",
    "The lazy dog sleeps.",
    "  leading and trailing spaces  ",
    "Café déjà vu, naïve crème brûlée.",
    "東京 and 北京 are cities; 数据模型",
    "emoji 🙂🚀 mixed with text 👩‍👩‍👧",
    "line one\nline two\n\n\ttabbed",
    "",
    "a",
    "ZWJ\u200d and combining e\u0301 and \U0001f600!",
]

# A Llama-2-like template written for these tests: a system prompt folds into the first user
# turn, roles must alternate, and it uses bos_token/eos_token variables.
SP_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}\n"
    "{%- for m in turns %}\n"
    "    {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('roles must alternate user/assistant/user/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if m['role'] == 'user' %}\n"
    "        {{- bos_token + '[INST] ' }}{% if loop.first and system %}<<SYS>>{{ system }}<</SYS>> {% endif %}"
    "{{- m['content'] | trim + ' [/INST]' }}\n"
    "    {%- else %}\n"
    "        {{- ' ' + m['content'] | trim + ' ' + eos_token }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# ChatML with a tools block: exercises tojson, namespace and loop controls.
BYTE_CHAT_TEMPLATE = (
    "{%- set ns = namespace(n=0) %}\n"
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}\n"
    "{%- for m in messages %}\n"
    "{%- if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
    "{%- set ns.n = ns.n + 1 %}\n"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 東京 🙂"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "  three  "}],
]


def _byte_level_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|>:1 $B:1",
                                                       special_tokens=[("<|bos|>", 0)])
    return tok, {"bos_token": "<|bos|>", "eos_token": "<|im_end|>", "pad_token": "<|eos|>"}, BYTE_CHAT_TEMPLATE


def _sentencepiece_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    # Byte fallback needs the 256 <0xNN> pieces in the model's own vocabulary (not as added tokens).
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Backend.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, SP_CHAT_TEMPLATE


BUILDERS = {"byte_level": _byte_level_tokenizer, "sentencepiece": _sentencepiece_tokenizer}


def build_tokenizer_checkpoint(kind: str, out_dir: Path) -> Path:
    """Train the ``kind`` tokenizer and save it through transformers, as a real checkpoint has it."""
    from transformers import PreTrainedTokenizerFast

    backend, specials, template = BUILDERS[kind]()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    fast.chat_template = template
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def checkpoint(request, tmp_path_factory) -> Path:
    return build_tokenizer_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def pair(checkpoint):
    from transformers import AutoTokenizer

    return Tokenizer.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_matches_transformers(pair, text):
    ours, hf = pair
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_bos_comes_from_post_processor_once(pair):
    ours, hf = pair
    ids = ours.encode("Hello, world!")
    assert ids[0] == ours.bos_token_id == hf.bos_token_id
    assert ids.count(ours.bos_token_id) == 1
    assert ours.bos_token_id not in ours.encode("Hello, world!", add_special_tokens=False)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_decode_matches_transformers(pair, text):
    ours, hf = pair
    ids = hf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_roundtrip_of_text_outside_training_data(pair):
    ours, _ = pair
    for text in SAMPLE_TEXTS:
        # The SentencePiece decoder strips one leading space, as Llama-2's does.
        assert ours.decode(ours.encode(text)) in (text, text[1:])


def test_sentencepiece_kind_really_uses_byte_fallback(tmp_path_factory):
    ours = Tokenizer.from_pretrained(build_tokenizer_checkpoint("sentencepiece", tmp_path_factory.mktemp("sp")))
    tokens = [ours.id_to_token(i) for i in ours.encode("東京 🙂", add_special_tokens=False)]
    assert "<0xE6>" in tokens and "<0xF0>" in tokens  # first bytes of 東 and of the emoji
    assert ours.decode(ours.encode("東京 🙂")) == "東京 🙂"


def test_decode_of_arbitrary_ids_matches_transformers(pair):
    import random

    ours, hf = pair
    rng = random.Random(0)
    for _ in range(50):
        # Random ids include special tokens and lone UTF-8 bytes (invalid sequences -> U+FFFD).
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_vocab_and_special_ids_match_transformers(pair):
    ours, hf = pair
    assert ours.vocab_size == len(ours) == len(hf)
    assert sorted(ours.all_special_ids) == sorted(hf.all_special_ids)
    assert ours.eos_token_ids == [hf.eos_token_id]
    for token_id in (0, 5, len(hf) - 1):
        assert ours.id_to_token(token_id) == hf.convert_ids_to_tokens(token_id)


def test_out_of_vocabulary_ids_decode_to_nothing_and_bad_ids_are_typed_errors(pair):
    ours, hf = pair
    ids = hf.encode("Hello", add_special_tokens=False)
    assert ours.decode(ids + [len(hf) + 10]) == ours.decode(ids)
    with pytest.raises(InvalidRequestError):
        ours.decode([-1])
    with pytest.raises(InvalidRequestError):
        ours.encode(123)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, conversation, add_generation_prompt):
    ours, hf = pair
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_with_tools_and_extra_variables(tmp_path):
    from transformers import AutoTokenizer

    path = build_tokenizer_checkpoint("byte_level", tmp_path / "bl")
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <b>now</b>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    chat = [{"role": "user", "content": "hi"}, {"role": "skip", "content": "x"}, {"role": "user", "content": "yo"}]
    expected = hf.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
    rendered = ours.apply_chat_template(chat, tools=tools)
    assert rendered == expected
    assert "Météo <b>now</b>" in rendered  # tojson neither escapes HTML nor non-ASCII
    assert "skip" not in rendered  # {% continue %} works


def test_chat_template_error_is_invalid_request(tmp_path):
    ours = Tokenizer.from_pretrained(build_tokenizer_checkpoint("sentencepiece", tmp_path / "sp"))
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_any_rendering_failure_is_invalid_request(checkpoint):
    ours = Tokenizer.from_pretrained(checkpoint, chat_template="{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template([{"role": "user", "content": "x"}])
    ours = Tokenizer.from_pretrained(checkpoint, chat_template="{{ documents | length }}{{ flag }}")
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], documents=[1, 2], flag="!") == "2!"


def test_content_parts_are_joined_for_string_templates(pair):
    ours, _ = pair
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template(joined)
    with pytest.raises(InvalidRequestError, match="image_url"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_content_parts_reach_templates_that_iterate_them(checkpoint):
    template = ("{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endfor %}")
    ours = Tokenizer.from_pretrained(checkpoint, chat_template=template)
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert ours.apply_chat_template([{"role": "user", "content": parts}]) == "[a][b]"


def test_none_values_are_dropped_like_transformers(pair):
    ours, hf = pair
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": None}]
    expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(chat, add_generation_prompt=False) == expected


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "no role"}], [{"role": "user", "content": 3}]])
def test_malformed_messages_are_invalid_requests(pair, messages):
    ours, _ = pair
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template(messages)


def test_missing_chat_template_is_a_clear_invalid_request(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(path)
    assert ours.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_generation_and_strftime_helpers(checkpoint):
    template = "{% generation %}{{ messages[0]['content'] }}{% endgeneration %}|{{ strftime_now('%Y') | length }}"
    ours = Tokenizer.from_pretrained(checkpoint, chat_template=template)
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "x|4"


def test_sandbox_blocks_unsafe_attribute_access(checkpoint):
    ours = Tokenizer.from_pretrained(checkpoint, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template([{"role": "user", "content": "x"}])
    ours = Tokenizer.from_pretrained(checkpoint, chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}ok")
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------- loading variants


def test_template_sources_and_priority(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    path = _copy(checkpoint, tmp_path)
    (path / "chat_template.jinja").unlink()
    listed = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
              {"name": "tool_use", "template": "T{{ messages[0]['content'] }}"}]
    _edit_json(path / "tokenizer_config.json", chat_template=listed)
    msg = [{"role": "user", "content": "m"}]
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert ours.apply_chat_template(msg) == hf.apply_chat_template(msg, tokenize=False) == "Dm"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(msg, tools=tools) == hf.apply_chat_template(msg, tools=tools, tokenize=False) \
        == "Tm"
    # A separate chat_template.jinja wins over tokenizer_config.json, as in transformers.
    (path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    hf = AutoTokenizer.from_pretrained(path)
    assert Tokenizer.from_pretrained(path).apply_chat_template(msg) == hf.apply_chat_template(msg, tokenize=False) \
        == "Jm"


def test_chat_template_override_by_text_or_file(checkpoint, tmp_path):
    msg = [{"role": "user", "content": "m"}]
    assert Tokenizer.from_pretrained(checkpoint, chat_template="<{{ messages[0].content }}>") \
        .apply_chat_template(msg) == "<m>"
    file = tmp_path / "t.jinja"
    file.write_text("F{{ messages | length }}")
    assert Tokenizer.from_pretrained(checkpoint, chat_template=str(file)).apply_chat_template(msg) == "F1"
    with pytest.raises(ConfigError):
        Tokenizer.from_pretrained(checkpoint, chat_template=str(tmp_path / "missing.jinja"))


def test_generation_config_eos_union_and_sampling_defaults(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    ours = Tokenizer.from_pretrained(path)
    eos = ours.eos_token_ids[0]
    _edit_json(path / "generation_config.json", eos_token_id=[7, 9], bos_token_id=ours.bos_token_id,
               temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1, do_sample=True)
    ours = Tokenizer.from_pretrained(path)
    assert ours.eos_token_ids == [7, 9, eos]
    assert ours.generation_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    _edit_json(path / "generation_config.json", eos_token_id=eos)
    assert Tokenizer.from_pretrained(path).eos_token_ids == [eos]


def test_added_token_dicts_and_special_tokens_map(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    path = _copy(checkpoint, tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    eos = config.pop("eos_token")
    config["bos_token"] = {"__type": "AddedToken", "content": config["bos_token"], "lstrip": False,
                           "rstrip": False, "normalized": False, "single_word": False, "special": True}
    config.pop("added_tokens_decoder", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos}))
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert ours.eos_token == hf.eos_token == eos
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.apply_chat_template(CONVERSATIONS[2]) == hf.apply_chat_template(CONVERSATIONS[2], tokenize=False,
                                                                              add_generation_prompt=True)


def test_add_bos_token_builds_a_post_processor_only_when_missing(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    bos = Tokenizer.from_pretrained(path).bos_token_id
    _edit_json(path / "tokenizer_config.json", add_bos_token=False)
    assert Tokenizer.from_pretrained(path).encode("hi")[0] == bos  # tokenizer.json's post-processor wins
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data))
    assert bos not in Tokenizer.from_pretrained(path).encode("hi")
    _edit_json(path / "tokenizer_config.json", add_bos_token=True, add_eos_token=True)
    ours = Tokenizer.from_pretrained(path)
    ids = ours.encode("hi")
    assert ids[0] == bos and ids[-1] == ours.eos_token_ids[-1] and ids[1:-1] == ours.encode("hi", False)


def test_missing_or_broken_checkpoint_is_a_model_load_error(tmp_path, checkpoint):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    path = _copy(checkpoint, tmp_path)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(path)
