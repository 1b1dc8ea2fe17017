"""`fmn-pl merge`: merge the bodies of task checkpoints with one method, save, evaluate each task, report.

    fmn-pl merge --config configs/merge/fmn.yaml
    fmn-pl merge --method fmn --method.broadcast per_node --checkpoints ckpt/rte ckpt/mrpc --output out/

Output folder (written in a temporary folder beside it, renamed when complete):

    config.json, tokenizer*, model.safetensors   the merged body: AutoModel.from_pretrained(out)
    <task>/                                      AutoModelForSequenceClassification.from_pretrained(out/<task>):
        model-body.safetensors                   a hard link to ../model.safetensors (the body is stored once);
                                                 the task's own body for methods that give each task one (TALL)
        model-head.safetensors                   the task's own classifier head
        model.safetensors.index.json             maps every tensor to one of the two files
        config.json, tokenizer*, fmn_pl.json     an fmn-pl task checkpoint of the merged model
        README.md                                its model card (also one for the body, beside config.json)
    report.json, report.md, report.png           merged vs individual vs plain average, per task
    config.yaml                                  the resolved configuration of this run
    <method>/                                    files a method keeps, if any (AdaMerging's logs, TALL's masks)

Inputs are checked before any work: at least two checkpoints of distinct tasks, one architecture,
vocabulary and tokenizer, the artifacts the method needs (present, of the right kind, computed on these
weights), and the base model when the method needs one.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from fmn_pl.checkpoint import METADATA_FILE, CheckpointMeta, weights_fingerprint
from fmn_pl.diagnostics import diagnostics
from fmn_pl.files import atomic_dir
from fmn_pl.merge_config import MergeConfig
from fmn_pl.merge_eval import Selection, evaluate_merge, log_line
from fmn_pl.merge_inputs import Inputs, check_inputs, method_name
from fmn_pl.merge_output import BODY_FILE, body_tensors, write_body, write_body_folder, write_task_folder
from fmn_pl.merge_report import MergeReport
from fmn_pl.merging import MergeMethod
from fmn_pl.options import SelectionOptions, check_count, check_finite, check_outside, is_local_path
from fmn_pl.progress import tee
from fmn_pl.resources import peak_rss_mb, reset_peak, set_mmap_threshold

# ---------------------------------------------------------------------------------------------- the stage


def run_merge(config: MergeConfig) -> MergeReport:
    """Merge task checkpoints' bodies with `config.method`, save the merged model, score every task with its own
    head on its GLUE validation rows, and report against the individual models and the plain average (the
    report, also written as report.json; `config.yaml` in the output reproduces the run)."""
    c = config
    check_count("batch_size", c.batch_size)
    c.selection.check()
    c.eval.check()
    check_finite(c.method.options(), "method")
    start = time.perf_counter()
    if c.push_to_hub:
        from fmn_pl.model_card import check_hub_token

        check_hub_token()
    set_mmap_threshold()
    reset_peak()  # the merge's own peak, also when it runs inside a pipeline process
    name, out = method_name(c.method), Path(c.output)
    check_output(out, c.checkpoints, c.overwrite, c.data_dir if c.evaluate else None)
    inputs = check_inputs(c.checkpoints, c.method, c.base, c.own_tensors or (), fingerprints=True)
    fingerprints = check_fingerprints(inputs)
    selection = Selection.over(
        inputs, selection_data(c.selection, inputs, c.data_dir, c.batch_size), c.accelerator, c.selection.precision
    )
    ctx = inputs.context(
        evaluate=selection.scores,
        selection_inputs=selection.inputs,
        accelerator=c.accelerator,
        progress=c.progress,
        log=tee(log_line),  # also the stage's progress line in a pipeline: candidates screened and scored
        finalists=c.selection.finalists,
        screen=c.selection.screen_rows(),
    )
    report = input_report(name, c.label or name, c.method, inputs, fingerprints, c.own_tensors)
    timings: dict[str, float] = {"check_s": time.perf_counter() - start}
    with atomic_dir(out, overwrite=c.overwrite, wait=c.wait) as tmp:
        ctx.workdir = tmp / name
        report |= write_merge(tmp, inputs, c.method, ctx, fingerprints, c.save_model, c.progress, timings)
        report |= selection.report() | {"notes": _jsonable(ctx.notes), "choices": ctx.choices, "remarks": ctx.remarks}
        del ctx
        if c.evaluate:
            t0 = time.perf_counter()
            from fmn_pl.evaluate import EvalData

            eval_data = EvalData(c.data_dir, "validation", c.eval.max_samples, c.batch_size)
            report |= evaluate_merge(
                tmp,
                inputs,
                fingerprints,
                c.method,
                eval_data,
                c.accelerator,
                c.eval.cache,
                c.eval.compare_average,
                c.progress,
            )
            report["remarks"] += report.pop("eval_remarks")
            timings["eval_s"] = time.perf_counter() - t0
        report["timings"] = timings | {"total_s": time.perf_counter() - start}
        typed = finish_output(tmp, out, report, inputs, c)
    log_line(done_line(name, out, typed))
    if c.push_to_hub:
        from fmn_pl.model_card import push

        log_line(f"pushed {out} to {push(out, c.push_to_hub)}")
    return typed


def selection_data(options: SelectionOptions, inputs: Inputs, data_dir: str, batch_size: int) -> Any:
    """The `EvalData` methods choose on: `options.split` resolved against the checkpoints, capped at its samples."""
    from fmn_pl.evaluate import EvalData  # after the checks: tokenizers, metrics, Lightning

    split = resolve_selection_split(options.split, inputs.metadata)
    return EvalData(data_dir, split, options.samples, batch_size)


def finish_output(tmp: Path, out: Path, report: dict[str, Any], inputs: Inputs, config: MergeConfig) -> MergeReport:
    """The merge's output once merged and scored (`tmp`, renamed to `out` afterwards): the diagnostics, the report
    read once into a `MergeReport`, model cards (or the body removed when not kept), the config that reproduces
    it and the report files."""
    import yaml

    from fmn_pl.report import write_report

    report["diagnostics"] = diagnostics(inputs, report)  # task vectors, Fisher scale, prediction shares
    typed = MergeReport.from_dict(report | {"peak_rss_mb": peak_rss_mb(), "versions": _versions()})
    if config.save_model:
        write_cards(tmp, typed, inputs.metadata[0].base_model, out)
    else:
        (tmp / BODY_FILE).unlink()
        for task in inputs.tasks:
            shutil.rmtree(tmp / task)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_data(), sort_keys=False))
    write_report(tmp, typed)
    return typed


def write_cards(folder: Path, report: MergeReport, base_model: str, out: Path) -> None:
    """A model card (README.md) in the merged body's folder and in each task's, from the report (`out`: the final
    output folder, whose config.yaml reproduces the merge)."""
    from fmn_pl.model_card import merged_card, write_card

    command = f"fmn-pl merge --config {out / 'config.yaml'}"
    write_card(folder, merged_card(report, base_model, report.tasks, command))
    for task in report.tasks:
        write_card(folder / task, merged_card(report, base_model, [task], command))


def write_merge(
    folder: Path,
    inputs: Inputs,
    method: MergeMethod,
    ctx: Any,
    fingerprints: list[str],
    save_model: bool,
    progress: bool,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Merge into `folder`: the body streamed as the method yields it, then one folder per task (its head with the
    merged body, or the task's own body for methods that give each task one). Times go into `timings`."""
    t0 = time.perf_counter()
    write_body(folder, inputs, method.merge(ctx), progress)
    timings["merge_s"] = time.perf_counter() - t0
    peak = peak_rss_mb()
    if save_model:
        write_body_folder(folder, inputs)
    info = {
        "method": method_name(method),
        "options": method.options(),
        "fingerprints": fingerprints,
        "checkpoints": [str(p) for p in inputs.checkpoints],
    }
    links = [
        write_task_folder(folder, i, inputs, info, log_line, method.task_body(i, ctx), progress)
        for i in range(len(inputs.tasks))
    ]
    timings["write_s"] = time.perf_counter() - t0 - timings["merge_s"]
    storage = {"body_bytes": (folder / BODY_FILE).stat().st_size, "task_body": sorted(set(links))}
    return {"peak_rss_merge_mb": peak, "storage": storage}


def check_output(out: Path, checkpoints: Sequence[str | Path], overwrite: bool, data_dir: str | None) -> None:
    """Refuse, before any work, an output that would replace an input or lie inside one, or that holds something
    (unless `overwrite`), and a local data folder (when the merge evaluates) that does not exist."""
    check_outside(out, checkpoints)
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out} already exists and is not empty; pass --overwrite true to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    if data_dir is not None and is_local_path(data_dir) and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data directory {Path(data_dir).expanduser()} does not exist")


def check_fingerprints(inputs: Inputs) -> list[str]:
    """Each checkpoint's weight fingerprint (`check_inputs(fingerprints=True)` hashed them), refused where the files
    changed since export."""
    fingerprints = inputs.fingerprints
    assert fingerprints is not None, "check_inputs(..., fingerprints=True) hashes them"
    for p, m, fp in zip(inputs.checkpoints, inputs.metadata, fingerprints):
        if m.fingerprint not in (None, fp):
            raise ValueError(
                f"{p}: its weights changed since export ({METADATA_FILE} records {m.fingerprint}, "
                f"the files hash to {fp})"
            )
    return fingerprints


def input_report(
    name: str, label: str, method: MergeMethod, inputs: Inputs, fingerprints: list[str], own_tensors: Any
) -> dict[str, Any]:
    """The report's account of what was merged: method, options, checkpoints with their artifacts, base."""
    report: dict[str, Any] = {
        "method": name,
        "label": label,
        "options": method.options(),
        "tasks": inputs.tasks,
        "checkpoints": [
            {
                "task": t,
                "path": str(p),
                "fingerprint": fp,
                "artifacts": {k: dict(a.metadata) for (i, k), a in (inputs.artifacts or {}).items() if i == j},
            }
            for j, (t, p, fp) in enumerate(zip(inputs.tasks, inputs.checkpoints, fingerprints))
        ],
        "base": None
        if inputs.base is None
        else {"path": str(inputs.base), "fingerprint": weights_fingerprint(inputs.base)},
    }
    if inputs.own:
        report["own_tensors"] = {
            "patterns": list(own_tensors or ()),
            "tensors": inputs.own,
            "parameters": sum(math.prod(inputs.specs[k][1]) for k in inputs.own),
        }
    return report


def done_line(name: str, out: Path, report: MergeReport) -> str:
    """The merge's last line on the console: its mean scores, or its time when it did not evaluate."""
    s = report.summary
    if s is None:
        return f"{name}: merged in {report.timings['merge_s']:.1f} s; output: {out}"
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
    return (
        f"{name}: mean score {fmt(s.merged_score)} (average {fmt(s.average_score)}, individual "
        f"{fmt(s.individual_score)}); report: {out / 'report.md'}"
    )


def resolve_selection_split(split: str, metadata: list[CheckpointMeta]) -> Literal["holdout", "validation", "train"]:
    """`auto` -> holdout when every checkpoint held training rows out, else validation; other splits unchanged."""
    if split in ("holdout", "validation", "train"):
        return split  # type: ignore[return-value]  # narrowed by the test above
    if split != "auto":
        raise ValueError(f"selection.split must be auto, holdout, validation or train, got {split!r}")
    held = all(m.data.holdout_samples > 0 for m in metadata)
    return "holdout" if held else "validation"


def merge_body(
    checkpoints: Sequence[str | Path],
    method: MergeMethod,
    base: str | None = None,
    data_dir: str = "../shared/data/glue",
    selection: SelectionOptions | None = None,
    batch_size: int = 64,
    accelerator: str = "auto",
    evaluator: Any = None,
    notes: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    own_tensors: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """The merged body {key: tensor} (in the checkpoints' dtypes) held in memory: `run_merge`'s checks and
    context without files or evaluation, for studies of many merges (score it with `Evaluator.evaluate(body=)`).

    `selection`: the same `SelectionOptions` as `run_merge` (default: its defaults). `evaluator`: an `Evaluator`
    whose checkpoints cover these tasks, reused (with its tokenized data) by methods that choose options instead of
    one built from `selection`. `notes` (a dict) receives the method's notes (chosen lambda, ...). Methods that
    serve each task its own body (TALL) are refused. Tensors matching `own_tensors` are left out of the body, so
    `Evaluator.evaluate(body=)` scores each task with its own.
    """
    if type(method).task_body is not MergeMethod.task_body:
        raise ValueError(f"method {method_name(method)} gives each task its own body: use run_merge, not merge_body")
    options = selection or SelectionOptions()
    options.check()
    inputs = check_inputs(checkpoints, method, base, own_tensors)
    if evaluator is None:
        data = selection_data(options, inputs, data_dir, batch_size)
        chooser = Selection.over(inputs, data, accelerator, options.precision)
    else:
        chooser = Selection(evaluator, inputs.tasks)
    ctx = inputs.context(
        evaluate=chooser.scores,
        selection_inputs=chooser.inputs,
        accelerator=accelerator,
        progress=False,
        log=log or log_line,
        finalists=options.finalists,
        screen=options.screen_rows(),
    )
    body = dict(body_tensors(inputs, method.merge(ctx)))
    if notes is not None:
        notes.update(_jsonable(ctx.notes))
    return body


def _jsonable(x: Any) -> Any:
    """Notes as JSON: tensors to lists, float keys to strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def _versions() -> dict[str, str]:
    import transformers

    import fmn_pl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fmn_pl": getattr(fmn_pl, "__version__", "0"),
    }
