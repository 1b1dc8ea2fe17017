"""Scoring around a merge: the selection data a method chooses its options on (`Selection`), and the final
evaluation of every task against its individual model, the plain average and the constant baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from fmn_pl.evaluate import Rows
from fmn_pl.merge_inputs import Inputs
from fmn_pl.merging import MergeMethod
from fmn_pl.resources import scoring_memory


def log_line(msg: str) -> None:
    """One line of the merge's account on the console, above any progress bar."""
    tqdm.write(f"merge: {msg}")


class Selection:
    """The data methods choose their options on (or adapt on), for one merge: the scores of a candidate body
    with each task's own head, and each task's inputs; it counts what the method used, for the report."""

    def __init__(self, evaluator: Any, tasks: list[str]) -> None:
        if missing := [t for t in tasks if t not in evaluator.tasks]:
            raise ValueError(f"the selection evaluator has no checkpoint of task(s) {missing}")
        self.evaluator, self.tasks = evaluator, tasks
        self.where = [evaluator.tasks.index(t) for t in tasks]
        self.calls, self.adapted = 0, False

    @classmethod
    def over(cls, inputs: Inputs, data: Any, accelerator: str, precision: Any = "32") -> Selection:
        """A selection over the merge's own checkpoints and `data` (an `EvalData`)."""
        from fmn_pl.evaluate import Evaluator

        evaluator = Evaluator(inputs.checkpoints, data, accelerator, progress=False, precision=precision)
        return cls(evaluator, inputs.tasks)

    def scores(
        self, body: dict[str, torch.Tensor], tasks: Sequence[str] | None = None, limit: int | None = None
    ) -> dict[str, float]:
        """{task: score} of `body` (of `tasks` only, on `limit` examples each): `MergeContext.evaluate`."""
        self.calls += 1
        with scoring_memory():
            return {
                t: self.evaluator.evaluate(self.where[self.tasks.index(t)], body=body, limit=limit)["score"]
                for t in tasks or self.tasks
            }

    def inputs(self, i: int) -> Any:
        """Task i's selection data module: `MergeContext.selection_inputs`."""
        self.adapted = True
        return self.evaluator.datamodule(self.where[i])

    def report(self) -> dict[str, Any]:
        """What the report says of the selection: nothing when the method used none."""
        if not (self.calls or self.adapted):
            return {}
        data = self.evaluator.data
        return {
            "selection": {
                **data.identity(),
                "evaluations": self.calls,
                "adapted": self.adapted,
                "bf16": self.evaluator.bf16(),
                "transductive": data.split == "validation",
            }
        }


def evaluate_merge(
    folder: Path,
    inputs: Inputs,
    fingerprints: list[str],
    method: MergeMethod,
    data: Any,
    accelerator: str,
    cache: bool,
    compare_average: bool,
    progress: bool,
) -> dict[str, Any]:
    """The report's results (per task: merged, individual, plain average, constant), their summary and what
    they call for a remark about (`eval_remarks`)."""
    from fmn_pl.evaluate import EvalCache, Evaluator
    from fmn_pl.report import summary

    evaluator = Evaluator(inputs.checkpoints, data, accelerator, progress)
    plain = _is_plain_average(method)
    with scoring_memory():
        results = evaluate_all(
            folder,
            inputs,
            fingerprints,
            evaluator,
            EvalCache(cache, log_line),
            compare_average,
            reuse_average=plain,
            progress=progress,
            log=log_line,
        )
    remarks = []
    if not plain and all(r["average"] and r["merged"] == r["average"] for r in results.values()):
        remarks.append(
            "the merged model scores exactly as the plain average on every task: the method changed "
            "nothing these examples can show"
        )
        log_line(f"warning: {remarks[-1]}")
    return {"evaluation": data.identity(), "results": results, "summary": summary(results), "eval_remarks": remarks}


def evaluate_all(
    folder: Path,
    inputs: Inputs,
    fingerprints: list[str],
    evaluator: Any,
    cache: Any,
    compare_average: bool,
    reuse_average: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Per task: the saved merged model (folder/<task>), the individual checkpoint and the plain average."""
    from fmn_pl.merging.average import Average
    from fmn_pl.report import task_result

    merged, individual, average = {}, {}, {}
    rows: dict[str, dict[str, Rows]] = {t: {} for t in inputs.tasks}  # task -> model -> scored rows
    for i, task in enumerate(tqdm(inputs.tasks, desc="evaluate tasks", disable=not progress)):
        merged[task] = evaluator.evaluate(i, model_dir=folder / task, rows=rows[task].setdefault("merged", {}))
        key = {"what": "individual", "fingerprint": fingerprints[i], **evaluator.identity(i)}
        individual[task], rows[task]["individual"] = _cached(cache, inputs.checkpoints[i], key, evaluator, i)
    if compare_average:
        own = {"own_tensors": inputs.own} if inputs.own else {}  # the average keeps them too: another baseline
        keys = [
            {"what": "average", "fingerprints": fingerprints, **own, **evaluator.identity(i)}
            for i in range(len(inputs.tasks))
        ]
        if reuse_average:
            average = dict(merged)
            for t in inputs.tasks:
                rows[t]["average"] = rows[t]["merged"]
        else:
            hits = {t: cache.get(inputs.checkpoints[i], keys[i]) for i, t in enumerate(inputs.tasks)}
            for t, hit in hits.items():
                if hit is not None:
                    average[t], rows[t]["average"] = hit
            todo = [i for i, t in enumerate(inputs.tasks) if hits[t] is None]
            if todo:
                body = dict(Average().merge(inputs.context(log=log)))
                for i in tqdm(todo, desc="evaluate average", disable=not progress):
                    t = inputs.tasks[i]
                    average[t] = evaluator.evaluate(i, body=body, rows=rows[t].setdefault("average", {}))
                del body
        for i, t in enumerate(inputs.tasks):
            cache.put(inputs.checkpoints[i], keys[i], average[t], rows[t]["average"])
    baselines = [evaluator.baseline(i) for i in range(len(inputs.tasks))]
    results = {
        t: task_result(merged[t], individual[t], average.get(t), *baselines[i]) | {"rows": rows[t]}
        for i, t in enumerate(inputs.tasks)
    }
    for t, r in results.items():
        for flag in r["flags"]:
            log(f"warning: {t}: {flag}")
    return results


def _cached(cache: Any, checkpoint: Path, key: dict[str, Any], evaluator: Any, i: int) -> tuple[dict[str, float], Rows]:
    """(metrics, scored rows) of checkpoint i's own model: from the cache, else scored and cached."""
    hit = cache.get(checkpoint, key)
    if hit is not None:
        return hit
    rows: Rows = {}
    metrics = evaluator.evaluate(i, rows=rows)
    cache.put(checkpoint, key, metrics, rows)
    return metrics, rows


def _is_plain_average(method: MergeMethod) -> bool:
    from fmn_pl.merging.average import Average

    return type(method) is Average and not getattr(method, "coefficients", None)
