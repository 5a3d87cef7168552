"""IncrementalDetokenizer: streamed text equals transformers' decode of the whole output, stop
strings are found across token boundaries, and deltas concatenate exactly to the final text."""

from __future__ import annotations

import random

import pytest
from test_tokenizer import BUILDERS, build_tokenizer_checkpoint

from tureen.engine.detokenizer import IncrementalDetokenizer
from tureen.sampling_params import SamplingParams
from tureen.tokenizer import Tokenizer

MULTIBYTE_TEXTS = [
    "Café déjà vu, naïve crème brûlée.",
    "東京 and 北京 are cities; 数据模型",
    "emoji 🙂🚀 mixed 👩‍👩‍👧 with text",
    "  two leading spaces and e\u0301 combining",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tokenizers(request, tmp_path_factory):
    """(tureen Tokenizer, transformers tokenizer) for each tokenizer family."""
    from transformers import AutoTokenizer

    path = build_tokenizer_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def stream(tok: Tokenizer, ids: list[int], params: SamplingParams, rng: random.Random | None = None,
           prompt: list[int] | None = None):
    """Feed ``ids`` in chunks (random sizes when ``rng`` is given), taking a delta after each.

    Returns (detokenizer, deltas before the end, final delta, stop string or None)."""
    detok = IncrementalDetokenizer(tok, prompt or [], params)
    deltas, stop, pos = [], None, 0
    while pos < len(ids) and stop is None:
        size = rng.randint(1, 4) if rng else 1
        stop = detok.update(ids[pos:pos + size])
        pos += size
        deltas.append(detok.take_delta(finished=stop is not None))
    final = detok.take_delta(finished=True)
    return detok, deltas, final, stop


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_streamed_text_never_shows_half_characters(tokenizers, text):
    tok, hf = tokenizers
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas, final, stop = stream(tok, ids, SamplingParams())
    assert stop is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + final == detok.output_text == hf.decode(ids, skip_special_tokens=True)
    assert detok.output_text.strip() == text.strip()


def test_one_token_at_a_time_emits_each_character_once_it_is_final(tokenizers):
    tok, _ = tokenizers
    ids = tok.encode("a東", add_special_tokens=False)[-3:]  # neither tokenizer learned 東: three byte tokens
    assert tok.decode(ids) == "東" and all(tok.decode([i]) == "\ufffd" for i in ids)
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    texts, all_ids = [], ids + tok.encode("x", add_special_tokens=False)
    for token_id in all_ids:
        assert detok.update([token_id]) is None
        texts.append(detok.output_text)
    # Byte-level: 東 is final with its last byte. Byte fallback: a further <0xNN> piece could still
    # turn the whole run into U+FFFDs, so 東 waits for the next ordinary piece.
    after_last_byte = "" if tok.byte_fallback_ids else "東"
    assert texts[:3] == ["", "", after_last_byte] and texts[-1] == tok.decode(all_ids)


def test_byte_fallback_run_made_invalid_by_a_later_byte(tmp_path):
    from transformers import AutoTokenizer

    path = build_tokenizer_checkpoint("sentencepiece", tmp_path / "sp")
    tok, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "東".encode()] + [tok.token_to_id("<0x80>")]
    ids += tok.encode("x", add_special_tokens=False)
    assert hf.decode(ids) == "\ufffd" * 4 + " x"  # the decoder rejects the whole 4-byte run
    detok, deltas, final, _ = stream(tok, ids, SamplingParams())
    assert "".join(deltas) + final == detok.output_text == "\ufffd" * 4 + " x"
    assert "東" not in "".join(deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_final_only_without_stop_strings_decodes_once_at_the_end(tokenizers, skip_special_tokens):
    from tureen.sampling_params import RequestOutputKind

    tok, hf = tokenizers
    rng = random.Random(99)
    params = SamplingParams(skip_special_tokens=skip_special_tokens, output_kind=RequestOutputKind.FINAL_ONLY)
    for _ in range(30):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(1, 40))]
        counting = _CountingTokenizer(tok)
        detok = IncrementalDetokenizer(counting, [], params)  # type: ignore[arg-type]
        for pos in range(0, len(ids), 3):
            assert detok.update(ids[pos:pos + 3]) is None
        assert counting.sizes == []  # nothing decoded while generating
        assert detok.take_delta(finished=True) == detok.output_text == hf.decode(
            ids, skip_special_tokens=skip_special_tokens)
        assert counting.sizes == [len(ids)]
    # A stop string still needs the text as it grows.
    stopping = IncrementalDetokenizer(tok, [], SamplingParams(stop=["\n"], output_kind=RequestOutputKind.FINAL_ONLY))
    stopping.update(tok.encode("a line\nmore", add_special_tokens=False))
    assert stopping.stop_reason == "\n" and stopping.output_text == "a line"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_streams_equal_transformers_decode(tokenizers, skip_special_tokens):
    tok, hf = tokenizers
    rng = random.Random(1234)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(60):
        # Random ids mix special tokens, lone UTF-8 bytes (invalid sequences) and ordinary pieces.
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(1, 40))]
        detok, deltas, final, stop = stream(tok, ids, params, rng)
        expected = hf.decode(ids, skip_special_tokens=skip_special_tokens)
        assert stop is None
        assert detok.output_text == expected
        assert "".join(deltas) + final == expected


def test_incomplete_character_at_the_end_is_flushed_when_finished(tokenizers):
    tok, hf = tokenizers
    ids = tok.encode("ok 東", add_special_tokens=False)[:-1]  # drop the last byte of 東
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(ids)
    assert detok.output_text == "ok "
    assert detok.take_delta(False) == "ok "
    expected = hf.decode(ids, skip_special_tokens=True)  # byte-level: one U+FFFD; byte fallback: one per byte
    assert expected in ("ok \ufffd", "ok \ufffd\ufffd")
    assert detok.take_delta(True) == expected[3:]
    assert detok.output_text == expected
    assert detok.update(tok.encode("more", add_special_tokens=False)) is None  # finished: ignored
    assert detok.output_text == expected


def test_sentencepiece_leading_space_matches_decode_of_output_alone(tokenizers):
    tok, hf = tokenizers
    prompt = tok.encode("The lazy dog")
    ids = tok.encode(" quick fox", add_special_tokens=False)
    detok, deltas, final, _ = stream(tok, ids, SamplingParams(), prompt=prompt)
    assert detok.output_text == "".join(deltas) + final == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_kept_when_not_skipped(tokenizers):
    tok, hf = tokenizers
    eos = tok.eos_token_ids[0]
    ids = tok.encode("Hello", add_special_tokens=False) + [eos]
    for skip in (True, False):
        detok, deltas, final, _ = stream(tok, ids, SamplingParams(skip_special_tokens=skip))
        assert detok.output_text == hf.decode(ids, skip_special_tokens=skip)
        assert (tok.eos_token in detok.output_text) is (not skip)


# ------------------------------------------------------------------------------- stop strings


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_several_tokens(tokenizers, include):
    tok, _ = tokenizers
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    stop_str = "fox jumps"
    params = SamplingParams(stop=[stop_str, "never"], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tok, [], params)
    results, deltas = [], []
    for i in ids:
        results.append(detok.update([i]))
        deltas.append(detok.take_delta(finished=results[-1] is not None))
        if results[-1] is not None:
            break
    # It fires exactly when the text first contains the stop string, which took several tokens.
    assert results[-1] == stop_str and results[:-1] == [None] * (len(results) - 1)
    assert stop_str in tok.decode(ids[:len(results)]) and stop_str not in tok.decode(ids[:len(results) - 1])
    assert not any(stop_str in tok.id_to_token(i).replace("▁", " ").replace("Ġ", " ") for i in ids)
    expected = "The quick brown fox jumps" if include else "The quick brown "
    assert detok.output_text == expected == "".join(deltas)
    assert detok.stop_reason == stop_str
    assert detok.update(tok.encode(" more", add_special_tokens=False)) is None
    assert detok.take_delta(True) == "" and detok.output_text == expected


def test_earliest_stop_string_wins(tokenizers):
    tok, _ = tokenizers
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["dog", "brown", "quick brown"]))
    assert detok.update(ids) == "quick brown"
    assert detok.output_text == "The "


def test_stop_strings_ignore_the_prompt(tokenizers):
    tok, _ = tokenizers
    prompt = tok.encode("the lazy dog said")
    ids = tok.encode(" hello", add_special_tokens=False)
    detok, deltas, final, stop = stream(tok, ids, SamplingParams(stop=["lazy dog", "said"]), prompt=prompt)
    assert stop is None and detok.output_text == tok.decode(ids)


def test_multibyte_stop_string_over_byte_tokens(tokenizers):
    tok, _ = tokenizers
    ids = tok.encode("go to 東京 now", add_special_tokens=False)
    detok, deltas, final, stop = stream(tok, ids, SamplingParams(stop=["東京"]))
    assert stop == "東京"
    assert detok.output_text == "".join(deltas) + final == "go to "


def test_partial_stop_string_is_withheld_until_it_cannot_match(tokenizers):
    tok, _ = tokenizers
    ids = tok.encode("Hello, world fox jumps", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["fox!?", "ab"]))
    sent = ""
    for token_id in ids:
        assert detok.update([token_id]) is None
        sent += detok.take_delta(False)
        # Everything but the last len("fox!?") - 1 = 4 characters has been handed out.
        assert sent == detok.output_text[:max(len(detok.output_text) - 4, 0)]
    assert sent == "Hello, world fox j"
    assert detok.take_delta(True) == "umps"
    assert detok.output_text == "Hello, world fox jumps"


def test_without_stop_strings_nothing_is_withheld(tokenizers):
    tok, _ = tokenizers
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(tok.encode("Hello, world", add_special_tokens=False))
    assert detok.take_delta(False) == "Hello, world"


def test_random_stop_strings_truncate_exactly(tokenizers):
    tok, _ = tokenizers
    rng = random.Random(99)
    texts = MULTIBYTE_TEXTS + ["Continuous batching keeps the accelerator busy; paged attention keeps memory tidy."]
    checked = 0
    for _ in range(150):
        ids = tok.encode(rng.choice(texts), add_special_tokens=False)
        full = tok.decode(ids)
        start = rng.randrange(len(full))
        stop_str = full[start:start + rng.randint(1, 8)]
        if not stop_str.strip():
            continue
        include = rng.random() < 0.3
        params = SamplingParams(stop=[stop_str, "\x00never"], include_stop_str_in_output=include)
        detok, deltas, final, stop = stream(tok, ids, params, rng)
        index = full.find(stop_str)
        expected = full[:index + len(stop_str)] if include else full[:index]
        # A stop string ending in a byte-fallback run may only be confirmed when the stream finishes.
        assert detok.stop_reason == stop_str and stop in (stop_str, None)
        assert detok.output_text == expected
        assert "".join(deltas) + final == expected
        assert all(stop_str not in "".join(deltas[:k]) for k in range(len(deltas) + 1)) or include
        checked += 1
    assert checked > 100


# ------------------------------------------------------------------------------- cost


class _CountingTokenizer:
    """Delegates to a Tokenizer and records how many ids each decode call saw."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_per_token_work_does_not_grow_with_the_output(tokenizers):
    tok, _ = tokenizers
    counting = _CountingTokenizer(tok)
    ids = tok.encode(" ".join(MULTIBYTE_TEXTS) * 40, add_special_tokens=False)
    assert len(ids) > 2000
    detok = IncrementalDetokenizer(counting, [], SamplingParams(stop=["zzz"]))  # type: ignore[arg-type]
    pieces = []
    for i in ids:
        detok.update([i])
        pieces.append(detok.take_delta(False))
    pieces.append(detok.take_delta(True))
    # Each decode sees a short window, never the whole output: a few tokens, or for byte fallback
    # the longest run of byte pieces (the family emoji is 18 bytes) plus a few.
    longest_run = run = 0
    for token_id in ids:
        run = run + 1 if token_id in tok.byte_fallback_ids else 0
        longest_run = max(longest_run, run)
    assert max(counting.sizes) <= max(longest_run, 4) + 4 <= 24  # a 4-byte character: 4 byte-level tokens
    assert len(counting.sizes) <= 2 * len(ids)
    assert "".join(pieces) == detok.output_text == tok.decode(ids)
