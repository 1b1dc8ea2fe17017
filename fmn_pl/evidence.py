"""What the bundles of one study support: every score recomputed from the scored rows, a 95% interval on every
difference (a paired bootstrap over the rows within each seed: the same resampled rows for every model of a
seed and task; the mean over seeds), and the marks a score can carry (collapsed, within noise of its constant).

A difference is a win or a loss only where its interval excludes 0; a task whose individual model is within
noise of its constant is left out of method claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fmn_pl.bundle import INDIVIDUAL, Bundle
from fmn_pl.stats import collapsed, constant_predictions, interval, score
from fmn_pl.tasks import get_task

CONSTANT = "constant"
RESAMPLES = 2000
SHARE_FLOOR = -100.0  # a cell's share above constant counts at least this (x100)


@dataclass(frozen=True)
class Estimate:
    """A mean over cells and seeds with its 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int = 1
    """How many seeds it is the mean over (a model run on fewer seeds than the study has says so)."""

    @property
    def verdict(self) -> str:
        """ "win" / "loss" when the interval excludes 0, else "tie" (not established)."""
        return "win" if self.low > 0 else "loss" if self.high < 0 else "tie"

    def text(self, sign: bool = True) -> str:
        f = "{:+.1f}" if sign else "{:.1f}"
        return f"{f.format(self.mean)} [{f.format(self.low)}, {f.format(self.high)}]"


class Evidence:
    """Scores of every (seed, combination, model, task) from the bundles, with shared bootstrap resamples."""

    def __init__(self, bundles: Sequence[Bundle], resamples: int = RESAMPLES, seed: int = 0) -> None:
        if not bundles:
            raise ValueError("no bundle to read")
        self.bundles = list(bundles)
        self.seeds = [b.seed for b in bundles]
        self.labels: dict[int, dict[str, np.ndarray]] = {}  # seed -> task -> labels (rows by id)
        self.preds: dict[tuple[int, str, str, str], np.ndarray] = {}  # (seed, combo, model, task) -> predictions
        for b in bundles:
            self._index(b)
        rng = np.random.default_rng(seed)
        self.draws = {
            (s, t): rng.integers(0, len(y), (resamples, len(y))) for s in self.seeds for t, y in self.labels[s].items()
        }
        self._cache: dict[tuple[int, str, str, str, bool], np.ndarray] = {}
        meta = bundles[0].meta
        self.tasks = [t for t in meta["config"]["tasks"] if t in self.labels[self.seeds[0]]]
        merges = [k for b in bundles for k in b.meta["merges"]]
        self.combinations = list(dict.fromkeys(k.split("/")[0] for k in merges))
        self.methods = list(dict.fromkeys(k.split("/")[1] for k in merges))

    def _index(self, b: Bundle) -> None:
        r = b.rows
        keys = list(zip(r["combination"], r["model"], r["task"]))
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        labels: dict[str, np.ndarray] = {}
        for (combo, model, task), at in groups.items():
            order = sorted(at, key=lambda i: (r["split"][i], r["row"][i]))  # every model: the same row order
            y = np.array([r["label"][i] for i in order], dtype=float)
            if task in labels and not np.array_equal(labels[task], y):
                raise ValueError(f"seed {b.seed}: {model} on {task} was scored on other rows than the rest")
            labels[task] = y
            self.preds[(b.seed, combo, model, task)] = np.array([r["prediction"][i] for i in order], dtype=float)
        self.labels[b.seed] = labels

    # ------------------------------------------------------------------------------------------ scores

    def has(self, seed: int, combo: str, model: str, task: str) -> bool:
        return model == CONSTANT or self._key(seed, combo, model, task) in self.preds

    @staticmethod
    def _key(seed: int, combo: str, model: str, task: str) -> tuple[int, str, str, str]:
        """The individual model and the constant answer are the same in every combination of a seed and task."""
        return (seed, "" if model in (INDIVIDUAL, CONSTANT) else combo, model, task)

    def predictions(self, seed: int, combo: str, model: str, task: str) -> np.ndarray:
        if model == CONSTANT:
            return constant_predictions(get_task(task), self.labels[seed][task])
        return self.preds[self._key(seed, combo, model, task)]

    def score(self, seed: int, combo: str, model: str, task: str, resampled: bool = False) -> np.ndarray:
        """The GLUE score x100 of one model on one cell of one seed (B resampled scores when `resampled`)."""
        key = (*self._key(seed, combo, model, task), resampled)  # scored once per seed and task, not per cell
        if key not in self._cache:
            y, p = self.labels[seed][task], self.predictions(seed, combo, model, task)
            if resampled:
                idx = self.draws[(seed, task)]
                y, p = y[idx], p[idx]
            self._cache[key] = score(get_task(task), y, p)
        return self._cache[key]

    def collapsed(self, seed: int, combo: str, model: str, task: str) -> bool:
        return collapsed(get_task(task), self.labels[seed][task], self.predictions(seed, combo, model, task))

    # ------------------------------------------------------------------------------------------ estimates

    def seeds_with(self, models: Sequence[str], cells: Sequence[tuple[str, str]]) -> list[int]:
        """The seeds in which every one of `models` was scored on every cell."""
        return [s for s in self.seeds if all(self.has(s, c, m, t) for m in models for c, t in cells)]

    def difference(self, a: str, b: str, cells: Sequence[tuple[str, str]]) -> Estimate | None:
        """Mean over `cells` ((combination, task)) and the seeds that have both models of score(a) - score(b),
        with its interval; None when no seed has both on every cell."""
        point, boot = [], []
        seeds = self.seeds_with([a, b], cells)
        for s in seeds:
            for combo, task in cells:
                point.append(self.score(s, combo, a, task) - self.score(s, combo, b, task))
                boot.append(self.score(s, combo, a, task, True) - self.score(s, combo, b, task, True))
        if not point:
            return None
        return Estimate(float(np.mean(point)), *interval(np.mean(boot, axis=0)), len(seeds))

    def share(self, model: str, cells: Sequence[tuple[str, str]], over: str = CONSTANT) -> Estimate | None:
        """Mean over cells and seeds of (model - over) / (individual - over), x100: the share of what the
        individual model learned beyond `over` (the constant) that `model` keeps. A cell counts at least
        SHARE_FLOOR: a collapse to the minority class on a task learned by a small margin (MRPC: 7 points) would
        otherwise weigh -800% and drown every other cell."""
        point, boot = [], []
        seeds = self.seeds_with([model], cells)
        for s in seeds:
            for combo, task in cells:
                ref, ind = (self.score(s, combo, m, task) for m in (over, INDIVIDUAL))
                point.append(100 * (self.score(s, combo, model, task) - ref) / (ind - ref) if ind != ref else np.nan)
                refs, inds = (self.score(s, combo, m, task, True) for m in (over, INDIVIDUAL))
                with np.errstate(divide="ignore", invalid="ignore"):
                    boot.append(100 * (self.score(s, combo, model, task, True) - refs) / (inds - refs))
        if not point or np.isnan(point).all():
            return None
        samples = np.nanmean(np.clip(boot, SHARE_FLOOR, 10 * -SHARE_FLOOR), axis=0)  # a replicate may divide by ~0
        return Estimate(float(np.nanmean(np.maximum(point, SHARE_FLOOR))), *interval(samples), len(seeds))

    def ratio(self, model: str, cells: Sequence[tuple[str, str]]) -> float | None:
        """The FMN paper's normalized score: mean over cells and seeds of model / individual, x100."""
        values = [
            100 * self.score(s, c, model, t) / self.score(s, c, INDIVIDUAL, t)
            for s in self.seeds
            for c, t in cells
            if self.has(s, c, model, t) and self.score(s, c, INDIVIDUAL, t) != 0
        ]
        return float(np.mean(values)) if values else None

    def mean_score(self, model: str, combo: str, task: str) -> Estimate:
        """A model's score on one cell, mean over the seeds that have it, with its interval over rows."""
        seeds = self.seeds_with([model], [(combo, task)])
        point = [float(self.score(s, combo, model, task)) for s in seeds]
        boot = np.mean([self.score(s, combo, model, task, True) for s in seeds], axis=0)
        return Estimate(float(np.mean(point)), *interval(boot), len(seeds))

    def collapses(self, model: str, cells: Sequence[tuple[str, str]]) -> int:
        """How many (seed, cell) results of `model` answered one thing."""
        return sum(
            self.collapsed(s, c, model, t)
            for s in self.seeds
            for c, t in cells
            if model != CONSTANT and self.has(s, c, model, t)
        )

    def near_constant(self, model: str, combo: str, task: str) -> bool:
        """Whether a model's score is within noise of the constant's on this cell (interval of the difference,
        mean over seeds, includes 0)."""
        d = self.difference(model, CONSTANT, [(combo, task)])
        return d is not None and d.low <= 0

    def competent(self, task: str) -> Estimate:
        """The individual model's gain over the constant, mean over seeds: a task counts in claims only when
        its interval excludes 0."""
        d = self.difference(INDIVIDUAL, CONSTANT, [("", task)])
        assert d is not None
        return d

    # ------------------------------------------------------------------------------------------ cells

    def cells(self, combos: Sequence[str], tasks: Sequence[str]) -> list[tuple[str, str]]:
        """(combination, task) cells of `combos` restricted to `tasks`."""
        return [(c, t) for c in combos for t in c.split("+") if t in tasks]

    def pairs(self) -> list[str]:
        return [c for c in self.combinations if c.count("+") == 1]

    def larger(self) -> list[str]:
        return [c for c in self.combinations if c.count("+") > 1]

    def competent_tasks(self) -> list[str]:
        return [t for t in self.tasks if self.competent(t).low > 0]

    def chosen(self, method: str) -> dict[str, dict[str, int]]:
        """How often each value of each searched option was chosen by `method`, over seeds and combinations."""
        out: dict[str, dict[str, int]] = {}
        for b in self.bundles:
            for key, merge in b.meta["merges"].items():
                if key.split("/")[1] != method:
                    continue
                for option, choice in (merge.get("choices") or {}).items():
                    counts = out.setdefault(option, {})
                    counts[str(choice["chosen"])] = counts.get(str(choice["chosen"]), 0) + 1
        return out

    def budget(self, method: str) -> int:
        """Distinct candidates `method` scored on held-out rows per merge (the most over its merges; 0: it chose
        nothing on data)."""
        return max(
            (
                int(m.get("candidates") or 0)
                for b in self.bundles
                for k, m in b.meta["merges"].items()
                if k.endswith(f"/{method}")
            ),
            default=0,
        )
