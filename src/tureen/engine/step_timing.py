"""Where a step's time goes: a lap timer the engine and the model runner share.

``LLMEngine.step`` and ``ModelRunner.execute`` call ``timer.lap(phase)`` at the end of each phase;
a lap charges the wall-clock and thread CPU time since the previous lap to ``phase``. The default
timer is ``NULL_TIMER``, whose laps do nothing (one attribute lookup and an empty call per phase),
so the hooks stay in the code at no measurable cost. ``LLMEngine.enable_step_timing()`` swaps in a
``StepTimer``; ``tureen bench single`` reads its ``report()``.

Phases, in step order (engine / runner):

- ``schedule``: the scheduler's ``schedule()`` and the engine's bookkeeping around it;
- ``prepare``: the runner turns the scheduler's output into input tensors and attention metadata;
- ``forward``: the decoder stack, with ``layer.<i>`` laps inside it where the path can time layers
  (the native decode stack times its layers in C; the module path uses forward hooks);
- ``logits``: the LM head on the sampled rows;
- ``sampling``: sampling metadata, the sampler and the copy of the tokens to the host;
- ``update``: the scheduler's ``update_from_output`` (appending tokens, freeing finished requests);
- ``output``: building ``RequestOutput`` objects; ``detokenize``: incremental detokenization and
  stop-string checks (charged separately inside ``output``).

CPU time is the calling thread's (``time.thread_time``): on a shared machine it stays close to the
work done while wall time also counts waiting for a core. Both are reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

PHASES = ("schedule", "prepare", "forward", "logits", "sampling", "update", "output", "detokenize")


class NullTimer:
    """The timer of an engine that is not being profiled: every lap is a no-op."""

    enabled = False

    def start(self) -> None:
        pass

    def lap(self, phase: str) -> None:
        pass

    def add(self, phase: str, wall_s: float, cpu_s: float = 0.0) -> None:
        pass

    def move(self, src: str, dst: str, wall_s: float, cpu_s: float = 0.0) -> None:
        pass

    def end_step(self) -> None:
        pass


NULL_TIMER = NullTimer()


@dataclass
class PhaseTotal:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    count: int = 0


@dataclass
class StepTimer:
    """Accumulates wall and thread-CPU seconds per phase over many steps."""

    enabled = True
    totals: dict[str, PhaseTotal] = field(default_factory=dict)
    steps: int = 0
    _wall: float = 0.0
    _cpu: float = 0.0

    def start(self) -> None:
        """Begin a step: the next lap is measured from here."""
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap (or ``start``) to ``phase``."""
        wall, cpu = time.perf_counter(), time.thread_time()
        self.add(phase, wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu

    def add(self, phase: str, wall_s: float, cpu_s: float = 0.0) -> None:
        """Charge a time measured elsewhere (per-layer times from the native stack)."""
        total = self.totals.get(phase)
        if total is None:
            total = self.totals[phase] = PhaseTotal()
        total.wall_s += wall_s
        total.cpu_s += cpu_s
        total.count += 1

    def move(self, src: str, dst: str, wall_s: float, cpu_s: float = 0.0) -> None:
        """Charge to ``dst`` a time that a lap of ``src`` already counted (the native decode step's
        LM head, which runs in the same call as its layers)."""
        self.add(src, -wall_s, -cpu_s)
        self.add(dst, wall_s, cpu_s)

    def end_step(self) -> None:
        self.steps += 1

    def reset(self) -> None:
        self.totals.clear()
        self.steps = 0

    def report(self) -> dict[str, dict[str, float]]:
        """Per phase: mean wall and CPU microseconds per step, and the share of the step's wall time.
        ``layer.<i>`` phases are part of ``forward`` and not added to the total again."""
        steps = max(self.steps, 1)
        top = {k: v for k, v in self.totals.items() if not k.startswith("layer.")}
        step_wall = sum(v.wall_s for v in top.values()) or 1e-12
        order = [p for p in PHASES if p in self.totals] + sorted(
            (k for k in self.totals if k not in PHASES), key=_phase_key)
        return {k: {"wall_us": self.totals[k].wall_s / steps * 1e6, "cpu_us": self.totals[k].cpu_s / steps * 1e6,
                    "share": self.totals[k].wall_s / step_wall} for k in order}

    def step_us(self) -> float:
        """Mean wall microseconds of a whole step (the sum of the top-level phases)."""
        return sum(v.wall_s for k, v in self.totals.items() if not k.startswith("layer.")) / max(self.steps, 1) * 1e6


def _phase_key(name: str) -> tuple[str, int]:
    head, _, tail = name.partition(".")
    return head, int(tail) if tail.isdigit() else -1
