"""``tureen cache calibrate``: choose the semantic threshold from labelled pairs, not by guessing.

Each line of the pairs file is ``{"a": ..., "b": ..., "same": true|false}``: ``same`` pairs are
paraphrases a hit may answer; the others are near-misses it must not. For each threshold from 0.80
to 0.99 the true-hit rate (same pairs served) and false-hit rate (different pairs served) are
measured with the cosine alone and with the verification stage, and the lowest threshold whose
false-hit rate is at or below the target is recommended. Also: what each check alone buys at that
threshold. A table on the terminal, a PNG plot, and optionally JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from tureen.gateway.cache.verify import CHECKS, verify

THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(20)]


def shipped_pairs() -> Path:
    return Path(str(resources.files("tureen.gateway.cache") / "data" / "pairs.jsonl"))


def read_pairs(path: Path) -> list[dict]:
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item.get("a"), str) or not isinstance(item.get("b"), str) or \
                not isinstance(item.get("same"), bool):
            raise ValueError(f"{path}:{n}: each line needs a (string), b (string) and same (true/false)")
        pairs.append(item)
    if not any(p["same"] for p in pairs) or all(p["same"] for p in pairs):
        raise ValueError(f"{path}: needs both same and different pairs")
    return pairs


@dataclass
class Row:
    threshold: float
    true_hit: float  # cosine alone
    false_hit: float
    true_hit_verified: float  # cosine and verification
    false_hit_verified: float


@dataclass
class Calibration:
    model: str
    pairs: int
    same: int
    different: int
    target: float
    rows: list[Row]
    recommended: float | None  # with verification
    recommended_cosine_only: float | None
    per_check: dict[str, dict[str, float]]  # at the recommended threshold: each check alone

    def row(self, threshold: float | None) -> Row | None:
        return next((r for r in self.rows if r.threshold == threshold), None)


def similarities(pairs: list[dict], encode, batch_size: int = 64, advance=None) -> np.ndarray:
    texts = [p["a"] for p in pairs] + [p["b"] for p in pairs]
    vectors = []
    for i in range(0, len(texts), batch_size):
        vectors.append(encode(texts[i:i + batch_size]))
        if advance is not None:
            advance(min(batch_size, len(texts) - i))
    v = np.concatenate(vectors)
    n = len(pairs)
    return np.sum(v[:n] * v[n:], axis=1)


def calibrate(pairs: list[dict], sims: np.ndarray, model: str, target: float = 0.01) -> Calibration:
    same = np.array([p["same"] for p in pairs])
    passed = {name: np.array([check(p["a"], p["b"]) for p in pairs]) for name, check in CHECKS.items()}
    verified = np.array([verify(p["a"], p["b"]) is None for p in pairs])
    rows = []
    for t in THRESHOLDS:
        hit = sims >= t - 1e-9
        rows.append(Row(t, _rate(hit, same), _rate(hit, ~same), _rate(hit & verified, same),
                        _rate(hit & verified, ~same)))
    recommended = next((r.threshold for r in rows if r.false_hit_verified <= target), None)
    cosine_only = next((r.threshold for r in rows if r.false_hit <= target), None)
    per_check = {}
    at = recommended if recommended is not None else THRESHOLDS[-1]
    hit = sims >= at - 1e-9
    for name, ok in passed.items():
        per_check[name] = {"true_hit": _rate(hit & ok, same), "false_hit": _rate(hit & ok, ~same)}
    return Calibration(model, len(pairs), int(same.sum()), int((~same).sum()), target, rows, recommended,
                       cosine_only, per_check)


def _rate(mask: np.ndarray, among: np.ndarray) -> float:
    return float((mask & among).sum() / max(1, among.sum()))


def plot(result: Calibration, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.threshold for r in result.rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(t, [r.true_hit for r in result.rows], "--", color="tab:green", label="true hits, cosine only")
    ax.plot(t, [r.false_hit for r in result.rows], "--", color="tab:red", label="false hits, cosine only")
    ax.plot(t, [r.true_hit_verified for r in result.rows], color="tab:green", label="true hits, verified")
    ax.plot(t, [r.false_hit_verified for r in result.rows], color="tab:red", label="false hits, verified")
    ax.axhline(result.target, color="grey", lw=0.8, ls=":", label=f"target false-hit rate {result.target:.0%}")
    if result.recommended is not None:
        ax.axvline(result.recommended, color="black", lw=0.8, label=f"recommended {result.recommended:.2f}")
    ax.set_xlabel("similarity threshold (cosine)")
    ax.set_ylabel("share of pairs served from the cache")
    ax.set_title(f"semantic cache calibration: {result.model}\n{result.same} paraphrases, "
                 f"{result.different} near-misses")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: Calibration):
    from rich.table import Table

    out = Table(title=f"{result.model}: {result.same} paraphrases, {result.different} near-misses")
    for column in ("threshold", "true hits", "false hits", "true hits (verified)", "false hits (verified)"):
        out.add_column(column, justify="right")
    for r in result.rows:
        style = "bold" if r.threshold == result.recommended else None
        out.add_row(f"{r.threshold:.2f}", f"{r.true_hit:.1%}", f"{r.false_hit:.1%}", f"{r.true_hit_verified:.1%}",
                    f"{r.false_hit_verified:.1%}", style=style)
    return out


def markdown(result: Calibration) -> str:
    lines = ["| threshold | true hits | false hits | true hits, verified | false hits, verified |",
             "|---|---|---|---|---|"]
    for r in result.rows:
        mark = " **(default)**" if r.threshold == result.recommended else ""
        lines.append(f"| {r.threshold:.2f}{mark} | {r.true_hit:.1%} | {r.false_hit:.1%} | {r.true_hit_verified:.1%} "
                     f"| {r.false_hit_verified:.1%} |")
    return "\n".join(lines)


def to_json(result: Calibration) -> str:
    return json.dumps(asdict(result), indent=2)
