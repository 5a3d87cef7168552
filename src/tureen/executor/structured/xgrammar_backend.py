"""The xgrammar backend: compiles constraints against the tokenizer, keeps one matcher per request,
and fills the packed token bitmask of a whole step.

xgrammar precomputes, per grammar, which vocabulary tokens each grammar position can take
(an adaptive token mask cache), so filling a request's mask is a fast lookup plus a check of the
few context-dependent tokens: about 1-2 us a row for the benchmark's JSON schema. The rows are
filled one after another on the calling thread. xgrammar's ``BatchGrammarMatcher`` spreads them
over worker threads instead, which measured 4-10x slower for 16 rows (96-207 us against 21-23 us
wall, a loaded 2-core VM): handing work to threads costs more than the work, and on a CPU the
forward pass already keeps every core busy.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from tureen.errors import InvalidRequestError
from tureen.executor.structured.json_schema import check_schema, load_schema
from tureen.sampling_params import StructuredOutputsParams
from tureen.tokenizer import Tokenizer

_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] [^:]+:\d+: (Check failed: \(.*?\) is false: )?")


class XgrammarGrammar:
    """One request's constraint state: advances with each accepted token (see ``engine.request.Grammar``)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over the tokens one at a time; False (and no further advance) at the first one refused."""
        return all(self.matcher.accept_token(t) for t in token_ids)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)


class XgrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_threads: int = 2) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)

    # ---- compiling (runs in the manager's worker threads) ----------------------------------
    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar for ``spec``; InvalidRequestError naming the problem when it is bad."""
        param = f"structured_outputs.{spec.kind}"
        try:
            return self._compile(spec, param)
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar reports parse errors as RuntimeError with a C++ prefix
            message = (_LOG_PREFIX.sub("", str(exc).strip()).splitlines() or [type(exc).__name__])[0]
            raise InvalidRequestError(f"invalid {spec.kind} constraint: {message}", param=param) from None

    def _compile(self, spec: StructuredOutputsParams, param: str) -> Any:
        c = self.compiler
        whitespace = not spec.disable_any_whitespace
        if spec.json is not None or spec.json_object:
            schema: Any = {"type": "object"}
            if spec.json is not None:
                schema = load_schema(spec.json, param)
                check_schema(schema, param)
            grammar = self._xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=whitespace,
                                                         strict_mode=spec.json is not None)
            return c.compile_grammar(_ban_control_characters(grammar))
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            return c.compile_grammar(choice_grammar(spec.choice))
        assert spec.grammar is not None
        if "::=" in spec.grammar:  # EBNF / GBNF; Lark rules are written "name: ..."
            return c.compile_grammar(spec.grammar)
        return c.compile_lark(spec.grammar)

    # ---- per request and per step (engine thread) -------------------------------------------
    def new_grammar(self, compiled: Any) -> XgrammarGrammar:
        return XgrammarGrammar(self._xgr.GrammarMatcher(compiled))  # rollback is unlimited

    def fill_bitmask(self, grammars: list[XgrammarGrammar]) -> torch.Tensor:
        """(R, ceil(V / 32)) int32: row r holds the next tokens ``grammars[r]`` allows."""
        bitmask = self._xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        for row, grammar in enumerate(grammars):
            grammar.matcher.fill_next_token_bitmask(bitmask, row)
        return bitmask


# xgrammar (0.2.x) writes the characters of a length-bounded JSON string as [^"\\\r\n], which lets
# raw control characters through, and JSON forbids them inside strings. Its unbounded strings
# already exclude \0-\x1f; give the bounded ones the same class (the grammar text round-trips).
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _ban_control_characters(grammar: Any) -> Any:
    text = str(grammar)
    return text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR) if _LOOSE_STRING_CHAR in text else grammar


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the choices (JSON string literals are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """xgrammar's view of the vocabulary: every id's token string, the vocab type, the stop tokens.

    Special tokens and ids past the tokenizer's (padding rows of a larger embedding table) get
    empty strings, which xgrammar never allows: a chat marker must not appear inside a JSON string.
    The stop tokens stay allowed, by id, once the grammar is complete.
    """
    import xgrammar as xgr

    backend = tokenizer.backend
    special = set(tokenizer.all_special_ids) | {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    encoded = [""] * vocab_size
    for token, idx in backend.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size and idx not in special:
            encoded[idx] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    stop = [t for t in tokenizer.eos_token_ids if t < vocab_size] or None
    return xgr.TokenizerInfo(encoded, vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=stop, add_prefix_space=metadata["add_prefix_space"])
