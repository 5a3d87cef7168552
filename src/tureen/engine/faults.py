"""TEST-ONLY fault injection for the engine core process. Off unless the variable below is set.

``TUREEN_FAULT_INJECTION`` holds comma-separated ``ACTION@TOKEN`` rules; a model step that
schedules a request whose prompt contains token id ``TOKEN`` then does ``ACTION``:

- ``raise``: the step raises ``RuntimeError`` (the step's requests fail, the engine goes on);
- ``exit``: the engine process exits at once with code 70 (a crash: the watchdog restarts it);
- ``hang``: the step sleeps for an hour (a stall: the watchdog kills and restarts the process).

Example: ``TUREEN_FAULT_INJECTION=raise@77,exit@78,hang@79 tureen serve``. Never set it in
production; the engine logs a warning when it is on. The warm-up generation after a restart uses
an ordinary prompt, so it does not trip a rule unless its prompt contains the token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from tureen.engine.executor import Executor
from tureen.engine.messages import ModelRunnerOutput, SchedulerOutput
from tureen.errors import ConfigError

ENV_VAR = "TUREEN_FAULT_INJECTION"
ACTIONS = ("raise", "exit", "hang")
CRASH_EXIT_CODE = 70
HANG_S = 3600.0


@dataclass
class FaultPlan:
    rules: dict[int, str] = field(default_factory=dict)  # trigger token id -> action

    @property
    def active(self) -> bool:
        return bool(self.rules)

    @classmethod
    def parse(cls, spec: str) -> "FaultPlan":
        rules: dict[int, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            action, _, token = part.partition("@")
            if action not in ACTIONS or not token.isdigit():
                raise ConfigError(f"{ENV_VAR}: expected ACTION@TOKEN with ACTION in {ACTIONS}, got {part!r}")
            rules[int(token)] = action
        return cls(rules)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "FaultPlan":
        return cls.parse(environ.get(ENV_VAR, ""))

    def describe(self) -> str:
        return ", ".join(f"{action} when a prompt holds token {tok}" for tok, action in self.rules.items())

    def action_for(self, sched: SchedulerOutput) -> str | None:
        for sr in sched.requests:
            for tok, action in self.rules.items():
                if tok in sr.prompt_token_ids:
                    return action
        return None


class FaultInjectingExecutor:
    """Wraps the real executor; does a rule's action before the step it matches."""

    def __init__(self, inner: Executor, plan: FaultPlan) -> None:
        self.inner, self.plan = inner, plan

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        action = self.plan.action_for(sched)
        if action == "raise":
            raise RuntimeError("injected fault (TUREEN_FAULT_INJECTION): model step raised")
        if action == "exit":
            os._exit(CRASH_EXIT_CODE)
        if action == "hang":
            time.sleep(HANG_S)
        return self.inner.execute(sched)
