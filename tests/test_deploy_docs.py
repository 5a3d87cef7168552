"""docs/deploy.md and docs/runbook.md: every deploy/ path they name exists, and every `tureen ...`
command line in their shell blocks parses with the real CLI (the gateway's once it is registered)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tureen.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "deploy.md", ROOT / "docs" / "runbook.md"]


def _commands(path: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].split("&&")[0].strip() for line in joined.splitlines()
            if line.strip().startswith("tureen ")]


def test_paths_named_in_the_docs_exist():
    for doc in DOCS:
        for path in set(re.findall(r"`(deploy/[\w./-]+)`", doc.read_text())):
            assert (ROOT / path.rstrip("/")).exists(), (doc.name, path)


COMMANDS = [c for doc in DOCS for c in _commands(doc)]


@pytest.mark.parametrize("line", COMMANDS)
def test_documented_commands_parse(line):
    argv = shlex.split(line.replace('"$KEY"', "sk-x").replace('"$HF_TOKEN"', "x"))[1:]
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    if argv[0] not in commands:
        pytest.skip(f"`tureen {argv[0]}` is not registered on this branch")
    if "--help" in argv:
        return
    parser.parse_args(argv)


def test_the_walkthrough_covers_switch_and_rollback():
    assert "tureen deploy switch --to green" in COMMANDS and "tureen deploy switch --to blue" in COMMANDS
