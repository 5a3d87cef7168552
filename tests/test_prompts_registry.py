"""Prompt registry units: typed variables, the sandbox, StrictUndefined, chat templates, canary, reload."""

from __future__ import annotations

import pytest

from prompt_fixtures import commit_all, make_repo, write_prompt, write_tags
from tureen.prompts.registry import PromptError, Registry, canary_bucket

VARS = {"customer": {"type": "string"}, "tier": {"type": "enum", "values": ["free", "pro"], "default": "free"},
        "limit": {"type": "integer", "default": 3}, "topics": {"type": "list", "items": "string", "default": []}}


@pytest.fixture
def root(tmp_path):
    root = make_repo(tmp_path)
    write_prompt(root, "support", {"v1": "Help {{ customer }} ({{ tier }}, {{ limit + 1 }}): "
                                         "{{ topics | join(',') }}",
                                   "v2": "v2 for {{ customer }}"}, variables=VARS)
    write_tags(root, {"support": {"stable": "v1", "canary": "v2", "canary_weight": 20}})
    commit_all(root)
    return root


def test_typed_variables_render_with_defaults_and_coercion(root):
    resolved = Registry(root).resolve("support", version="v1")
    assert resolved.render({"customer": "Ada", "limit": "7", "topics": "a, b"}) == [
        {"role": "system", "content": "Help Ada (free, 8): a,b"}]


@pytest.mark.parametrize("variables,param", [
    ({}, "customer"),  # missing
    ({"customer": 3}, "customer"),  # wrong type
    ({"customer": "x", "tier": "gold"}, "tier"),  # not in the enum
    ({"customer": "x", "limit": "many"}, "limit"),
    ({"customer": "x", "topics": [1]}, "topics[0]"),
    ({"customer": "x", "extra": 1}, "extra"),  # undeclared
])
def test_bad_variables_are_400s_naming_the_variable(root, variables, param):
    with pytest.raises(PromptError) as info:
        Registry(root).resolve("support", version="v1").render(variables)
    assert info.value.status == 400 and info.value.param == f"prompt.variables.{param}"
    assert param.split("[")[0] in str(info.value)


def test_sandbox_refuses_dunder_access_and_undefined_names(tmp_path):
    root = make_repo(tmp_path)
    write_prompt(root, "evil", {"v1": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                "v2": "{{ not_declared }}", "v3": "{{ cycler.__init__.__globals__ }}"})
    registry = Registry(root)
    for version in ("v1", "v2", "v3"):
        with pytest.raises(PromptError) as info:
            registry.resolve("evil", version=version).render({})
        assert info.value.status == 400
    with pytest.raises(PromptError, match="undefined"):
        registry.resolve("evil", version="v2").render({})


def test_chat_templates_render_to_messages(tmp_path):
    root = make_repo(tmp_path)
    write_prompt(root, "chat", {"v1": "### system\nYou help {{ who }}.\n### user\nExample question\n"
                                      "### assistant\nExample answer\n"},
                 variables={"who": {"type": "string"}}, type="chat")
    messages = Registry(root).resolve("chat", version="v1").render({"who": "Bo"})
    assert messages == [{"role": "system", "content": "You help Bo."}, {"role": "user", "content": "Example question"},
                        {"role": "assistant", "content": "Example answer"}]


def test_unknown_prompt_version_and_tag(root):
    registry = Registry(root)
    with pytest.raises(PromptError) as info:
        registry.resolve("nope")
    assert info.value.status == 404 and "nope" in str(info.value)
    with pytest.raises(PromptError, match="v9"):
        registry.resolve("support", version="v9")
    with pytest.raises(PromptError, match="beta"):
        registry.resolve("support", tag="beta")


def test_canary_share_and_stickiness_over_2000_requests_from_200_users(root):
    registry = Registry(root)
    seen: dict[str, set[str]] = {}
    for i in range(2000):
        user = f"user-{i % 200}"
        seen.setdefault(user, set()).add(registry.resolve("support", "stable", sticky_key=user).version)
    assert all(len(versions) == 1 for versions in seen.values())
    share = sum("v2" in v for v in seen.values()) / len(seen)
    assert abs(share - 0.20) <= 0.03
    assert all(0 <= canary_bucket("support", f"u{i}") < 100 for i in range(100))
    assert registry.resolve("support", "canary").version == "v2"


def test_malformed_changes_keep_the_last_good_state(root):
    registry = Registry(root)
    tags = root / "tags.yaml"
    for bad in ("support: [unclosed", "support: {stable: v7}", "support: {stable: nope}",
                "ghost: {stable: v1}\nsupport: {stable: v1}"):
        tags.write_text(bad)
        assert registry.reload_if_changed() is False
        assert registry.last_error and registry.resolve("support", sticky_key="x").version in ("v1", "v2")
        assert registry.tags("support").stable == "v1"
    (root / "support" / "v2.jinja2").write_text("{% if %}")  # syntax error in a version that would be tagged
    tags.write_text("support: {stable: v2}")
    assert registry.reload() is False and "syntax" in registry.last_error
    (root / "support" / "v2.jinja2").write_text("fixed {{ customer }}")
    assert registry.reload_if_changed() is True and registry.tags("support").stable == "v2"
    assert registry.last_error is None


def test_untagged_version_with_a_syntax_error_is_reported_on_use_only(root):
    (root / "support" / "v3.jinja2").write_text("{% for %}")
    registry = Registry(root)
    assert registry.resolve("support", sticky_key="a").version in ("v1", "v2")
    with pytest.raises(PromptError, match="syntax error"):
        registry.resolve("support", version="v3").render({"customer": "x"})
