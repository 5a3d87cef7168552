"""Structured outputs through the offline engine: 200 seeded sampled requests per constraint on a
tiny random checkpoint, each output checked by an independent parser (json, jsonschema, re)."""

from __future__ import annotations

import json
import re
from collections import Counter

import jsonschema
import pytest

from structured_fixtures import build_json_checkpoint
from tureen import LLM, SamplingParams, StructuredOutputsParams
from tureen.errors import InvalidRequestError

N = 200
PROMPT = "the quick brown fox"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "kind": {"enum": ["cat", "dog", 3]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
                 "required": ["id"]},
    },
    "required": ["name", "age", "kind", "user"],
}
REGEX = r"(cat|dog)-[0-9]{2,4}(\.[a-z]{1,3})?"
CHOICES = ["yes", "no", "maybe so", "東京"]
# Sums of numbers and parenthesised sums, e.g. 12+(3-4)
EBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"'
LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: /[0-9]+/ | "(" expr ")"'


def parses_as_sum(text: str) -> bool:
    """Recursive-descent parser for the EBNF above, written independently of the grammar engine."""
    pos = 0

    def term() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        start = pos
        while pos < len(text) and text[pos].isdigit():
            pos += 1
        return pos > start

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    return expr() and pos == len(text)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_json_checkpoint(tmp_path_factory.mktemp("json-llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), kv_cache_memory="64MiB", max_model_len=512, max_num_seqs=128)


def run(llm, spec: StructuredOutputsParams, n: int = N, max_tokens: int = 256, **params):
    outs = llm.generate([PROMPT] * n, [SamplingParams(seed=i, temperature=1.0, max_tokens=max_tokens,
                                                      structured_outputs=spec, **params) for i in range(n)],
                        use_tqdm=False)
    return [c for o in outs for c in o.outputs]


def test_json_schema_output_always_validates(llm):
    outs = run(llm, StructuredOutputsParams(json=SCHEMA))
    assert Counter(o.finish_reason for o in outs) == {"stop": N}
    for o in outs:
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > N // 2  # sampled, not one forced answer


def test_json_object_output_parses_whenever_it_ends(llm):
    outs = run(llm, StructuredOutputsParams(json_object=True), max_tokens=256)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= 0.75 * N  # random weights: a few strings run on to max_tokens
    for o in stopped:
        assert isinstance(json.loads(o.text), dict)
    for o in outs:
        assert o.text.lstrip().startswith("{")


def test_regex_output_fully_matches(llm):
    outs = run(llm, StructuredOutputsParams(regex=REGEX))
    assert all(o.finish_reason == "stop" and re.fullmatch(REGEX, o.text) for o in outs), \
        [o.text for o in outs if not re.fullmatch(REGEX, o.text)][:5]


def test_choice_output_is_one_of_the_choices(llm):
    outs = run(llm, StructuredOutputsParams(choice=CHOICES))
    counts = Counter(o.text for o in outs)
    assert set(counts) <= set(CHOICES) and len(counts) >= 3, counts
    assert all(o.finish_reason == "stop" for o in outs)


@pytest.mark.parametrize("grammar", [EBNF, LARK], ids=["ebnf", "lark"])
def test_grammar_output_parses(llm, grammar):
    outs = run(llm, StructuredOutputsParams(grammar=grammar), max_tokens=64)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= 0.9 * N
    assert all(parses_as_sum(o.text) for o in stopped), [o.text for o in stopped if not parses_as_sum(o.text)][:5]


def test_grammar_completion_finishes_with_stop_even_when_eos_is_ignored(llm):
    outs = run(llm, StructuredOutputsParams(choice=["yes", "no"]), n=20, ignore_eos=True)
    assert all(o.finish_reason == "stop" and o.text in ("yes", "no") for o in outs)


def test_unconstrained_requests_in_the_same_batch_are_untouched(llm):
    plain = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 4
    alone = llm.generate([PROMPT, "a lazy dog", "cache", "x"], plain, use_tqdm=False)
    mixed_params = [p for pair in zip(plain, [SamplingParams(seed=i, max_tokens=12, structured_outputs=
                                                             StructuredOutputsParams(json=SCHEMA)) for i in range(4)])
                    for p in pair]
    prompts = [p for pair in zip([PROMPT, "a lazy dog", "cache", "x"], [PROMPT] * 4) for p in pair]
    mixed = llm.generate(prompts, mixed_params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in mixed[::2]]


@pytest.mark.parametrize("engine_kwargs", [
    dict(max_num_batched_tokens=8),  # chunked prefill: each prompt spans several steps
    dict(num_gpu_blocks_override=160, block_size=4),  # forced preemption by recompute
], ids=["chunked-prefill", "preemption"])
def test_constraints_hold_under_chunked_prefill_and_preemption(model_dir, engine_kwargs):
    llm = LLM(str(model_dir), max_model_len=512, kv_cache_memory="64MiB", **engine_kwargs)
    prompt = "the quick brown fox jumps over a lazy dog " * 2
    params = [SamplingParams(seed=i, max_tokens=200, structured_outputs=StructuredOutputsParams(json=SCHEMA))
              for i in range(16)]
    outs = llm.generate([prompt] * 16, params, use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    if "num_gpu_blocks_override" in engine_kwargs:
        assert llm.llm_engine.scheduler.num_preemptions > 0


def test_n2_and_prefix_cache_hits_keep_one_state_per_sample(llm):
    params = SamplingParams(n=2, seed=7, max_tokens=256, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    first = llm.generate([PROMPT * 3] * 6, params, use_tqdm=False)
    again = llm.generate([PROMPT * 3] * 6, params, use_tqdm=False)  # the prompt blocks now hit the cache
    assert again[0].num_cached_tokens > 0
    for out in first + again:
        assert len(out.outputs) == 2
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert [c.text for o in first for c in o.outputs] == [c.text for o in again for c in o.outputs]


def test_stop_strings_still_cut_a_constrained_output(llm):
    outs = run(llm, StructuredOutputsParams(regex=r"abc-[0-9]{3}"), n=10, stop=["-"])
    assert all(o.text == "abc" and o.finish_reason == "stop" and o.stop_reason == "-" for o in outs)


@pytest.mark.parametrize("spec, needle", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "not a valid JSON schema"),
    (dict(json='{"type": "object",'), "not valid JSON"),
    (dict(json={"type": "integer", "multipleOf": 3}), "'multipleOf'"),
    (dict(json={"type": "string", "format": "credit-card"}), "'credit-card'"),
    (dict(regex="a(b"), "parenthesis"),
    (dict(grammar="root ::= foo"), "foo"),
    (dict(grammar="start: foo"), "foo"),
])
def test_bad_constraints_raise_a_clear_error_before_anything_runs(llm, spec, needle):
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        llm.generate([PROMPT], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_params_need_exactly_one_constraint():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+"))


def test_equal_constraints_compile_once(llm):
    manager = llm.llm_engine.structured
    before = manager.num_compiled
    run(llm, StructuredOutputsParams(regex="[xy]{5}"), n=8)
    run(llm, StructuredOutputsParams(regex="[xy]{5}"), n=8)
    assert manager.num_compiled == before + 1


def test_compiling_does_not_hold_up_other_requests_and_abort_while_compiling_is_clean(llm):
    engine = llm.llm_engine
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"fresh": {"type": "integer"}},
                                         "required": ["fresh"]})
    engine.add_request("plain", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("constrained", PROMPT, SamplingParams(max_tokens=4, structured_outputs=spec))
    engine.add_request("dropped", PROMPT, SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
        regex="[0-9]{30}")))
    engine.abort_request("dropped")  # may still be compiling: it never reaches the scheduler
    first = {o.request_id: o for o in engine.step()}
    assert first["plain"].outputs[0].token_ids  # decoded while the new grammar compiled
    assert first["dropped"].finished and first["dropped"].outputs[0].finish_reason == "abort"
    done = dict(first)
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step()})
    assert done["constrained"].outputs[0].text.startswith("{")
    assert engine.scheduler.kv.usage == 0.0 and not engine._compiling and engine._num_constrained == 0


def test_a_grammar_that_fails_in_the_background_finishes_its_request_without_harm(llm):
    engine = llm.llm_engine
    bad = StructuredOutputsParams(grammar="root ::= never_defined_here")
    engine.add_request("bad", PROMPT, SamplingParams(max_tokens=4, structured_outputs=bad))  # not pre-checked
    engine.add_request("good", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["bad"].outputs[0].finish_reason == "abort" and done["bad"].outputs[0].token_ids == []
    assert len(done["good"].outputs[0].token_ids) == 4
    with pytest.raises(InvalidRequestError, match="never_defined_here"):  # now known bad: refused at once
        engine.add_request("bad-again", PROMPT, SamplingParams(max_tokens=4, structured_outputs=bad))


def test_backend_and_tool_flags_are_checked_at_start_up():
    from tureen.config import EngineConfig
    from tureen.errors import ConfigError
    from tureen.server.config import ServerConfig

    assert EngineConfig.from_kwargs(structured_outputs_backend="xgrammar").structured_outputs.structured_outputs_backend \
        == "xgrammar"
    with pytest.raises(ConfigError, match="structured_outputs_backend"):
        EngineConfig.from_kwargs(structured_outputs_backend="outlines")
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        ServerConfig(enable_auto_tool_choice=True)
    with pytest.raises(ConfigError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="mistral", enable_auto_tool_choice=True)


def test_a_matcher_takes_drafted_tokens_one_at_a_time_and_rolls_back(llm):
    """What speculative decoding needs: feed a draft, stop at the first refused token, roll back."""
    manager, tok = llm.llm_engine.structured, llm.llm_engine.tokenizer
    compiled = manager.compile_async(StructuredOutputsParams(regex="ab+c")).result()
    grammar = manager.new_grammar(compiled)
    a, b, c = (tok.encode(ch, add_special_tokens=False)[0] for ch in "abc")
    assert grammar.accept_tokens([a, b, b])
    assert not grammar.accept_tokens([b, a, c])  # the draft's second token breaks the grammar
    grammar.rollback(2)  # back to "ab": drop the accepted b's of the rejected draft and one more
    assert grammar.accept_tokens([c, tok.eos_token_ids[0]]) and grammar.is_terminated()
