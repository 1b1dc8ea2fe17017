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
from fmn_pl.merge_eval import Selection, evaluate_merge, log_line
from fmn_pl.merge_inputs import Inputs, check_inputs, method_name
from fmn_pl.merge_output import BODY_FILE, body_tensors, write_body, write_body_folder, write_task_folder
from fmn_pl.merging import MergeMethod
from fmn_pl.options import check_count, check_finite, check_outside, is_local_path
from fmn_pl.progress import tee
from fmn_pl.resources import peak_rss_mb, reset_peak, set_mmap_threshold

# ---------------------------------------------------------------------------------------------- the stage


def run_merge(
    checkpoints: list[str],
    method: MergeMethod,
    output: str,
    base: str | None = None,
    overwrite: bool = False,
    wait: bool = False,
    evaluate: bool = True,
    save_model: bool = True,
    data_dir: str = "../shared/data/glue",
    max_eval_samples: int | None = None,
    batch_size: int = 64,
    selection_split: Literal["auto", "holdout", "validation", "train"] = "auto",
    selection_samples: int | None = 300,
    selection_screen: int | None = 64,
    selection_finalists: int = 4,
    selection_precision: Literal["32", "bf16", "auto"] = "auto",
    compare_average: bool = True,
    cache: bool = True,
    accelerator: str = "auto",
    progress: bool = True,
    label: str | None = None,
    config_yaml: str | None = None,
    own_tensors: list[str] | None = None,
    push_to_hub: str | None = None,
) -> dict[str, Any]:
    """Merge task checkpoints' bodies with `method`, save the merged model, evaluate every task with its own head
    on its GLUE validation split, and report against the individual models and the plain average.

    Args:
        checkpoints: fmn-pl task checkpoint folders (two or more, distinct tasks, one architecture and tokenizer).
        method: the merge method: a registered name (average, fmn, fisher, task_arithmetic, ties, regmean,
            adamerging, tall, consensus, ...) with its options as --method.<option>; `--method NAME --help` lists
            a method's options.
        output: folder to write (refused if it exists and is not empty, unless `overwrite`).
        base: the pretrained model (folder or hub name) for methods on task vectors; default: the checkpoints'
            recorded base_model.
        overwrite: replace an existing output folder (only once the new one is complete).
        wait: wait for another run writing `output` (it holds `.NAME.lock` beside it) to finish, instead of
            refusing at once; its finished output is then refused unless `overwrite`.
        evaluate: score the merged model, the individual models and the plain average on every task.
        save_model: keep the merged model in the output folder (false: reports only).
        data_dir: GLUE data: a local folder (parquet or TSV layout) or a hub dataset name.
        max_eval_samples: cap on the validation examples per task (a seeded sample); None: all.
        batch_size: evaluation batch size.
        selection_split: data on which methods choose their options (task arithmetic's lambda, TALL's masks, ...)
            or adapt on unlabeled inputs (AdaMerging): holdout (the training rows each checkpoint held out),
            validation (the scored examples: transductive), train; auto: holdout when every checkpoint held rows
            out, else validation.
        selection_samples: cap on the selection examples per task (a seeded sample); None: all. 300 is where
            FMN's defaults were chosen (docs/results.md): scoring costs time in proportion, and on 300 examples a
            difference of a point or two between candidates is noise anyway.
        selection_screen: a search over more than `selection_finalists` candidates first scores each on this many
            selection examples per task (spread evenly), then only the best `selection_finalists` on all of them;
            None: every candidate on every example (the cost grows with the candidates).
        selection_finalists: how many candidates the screening keeps.
        selection_precision: selection scoring under bfloat16 autocast ("bf16"; "auto": where the device supports
            it, 2.5-3x faster on CPUs with AMX) or in float32 ("32"). Reported scores are always float32.
        compare_average: also score the plain average (cached per checkpoint set); the report's baseline.
        cache: remember individual and plain-average scores beside each checkpoint (fmn_pl_eval.json).
        accelerator: Lightning accelerator for evaluation (auto, cpu, gpu, ...).
        progress: show progress bars.
        label: the name of this merge in reports (default: the method name).
        config_yaml: the resolved configuration, saved as config.yaml (set by the CLI).
        own_tensors: glob patterns of body tensors that are not merged: each task keeps its own, with its head
            (e.g. ["*.pooler.*"]: BERT's pooler, which RoBERTa and DistilBERT already keep in their heads). The
            plain average the report compares with keeps them too; the bare merged body lacks them.
        push_to_hub: a Hub repo id ("user/name") to upload the output folder to once it is complete (created if
            absent; needs a token: `hf auth login` or HF_TOKEN).
    """

    for option, value in (
        ("max_eval_samples", max_eval_samples),
        ("selection_samples", selection_samples),
        ("batch_size", batch_size),
        ("selection_screen", selection_screen),
        ("selection_finalists", selection_finalists),
    ):
        check_count(option, value)
    check_finite(method.options(), "method")
    start = time.perf_counter()
    if push_to_hub:
        from fmn_pl.model_card import check_hub_token

        check_hub_token()
    set_mmap_threshold()
    reset_peak()  # the merge's own peak, also when it runs inside a pipeline process
    name, out = method_name(method), Path(output)
    check_output(out, checkpoints, overwrite, data_dir if evaluate else None)
    inputs = check_inputs(checkpoints, method, base, own_tensors or (), fingerprints=True)
    fingerprints = check_fingerprints(inputs)
    from fmn_pl.evaluate import EvalData  # after the checks: tokenizers, metrics, Lightning

    split = resolve_selection_split(selection_split, inputs.metadata)
    selection = Selection.over(
        inputs, EvalData(data_dir, split, selection_samples, batch_size), accelerator, selection_precision
    )
    screen = selection_screen if selection_samples is None or selection_samples > (selection_screen or 0) else None
    ctx = inputs.context(
        evaluate=selection.scores,
        selection_inputs=selection.inputs,
        accelerator=accelerator,
        progress=progress,
        log=tee(log_line),  # also the stage's progress line in a pipeline: candidates screened and scored
        finalists=selection_finalists,
        screen=screen,
    )
    report = input_report(name, label or name, method, inputs, fingerprints, own_tensors)
    timings: dict[str, float] = {"check_s": time.perf_counter() - start}
    with atomic_dir(out, overwrite=overwrite, wait=wait) as tmp:
        ctx.workdir = tmp / name
        report |= write_merge(tmp, inputs, method, ctx, fingerprints, save_model, progress, timings)
        report |= selection.report() | {"notes": _jsonable(ctx.notes), "choices": ctx.choices, "remarks": ctx.remarks}
        del ctx
        if evaluate:
            t0 = time.perf_counter()
            eval_data = EvalData(data_dir, "validation", max_eval_samples, batch_size)
            report |= evaluate_merge(
                tmp, inputs, fingerprints, method, eval_data, accelerator, cache, compare_average, progress
            )
            report["remarks"] += report.pop("eval_remarks")
            timings["eval_s"] = time.perf_counter() - t0
        report["timings"] = timings | {"total_s": time.perf_counter() - start}
        finish_output(tmp, out, report, inputs, save_model, config_yaml)
    log_line(done_line(name, out, report))
    if push_to_hub:
        from fmn_pl.model_card import push

        log_line(f"pushed {out} to {push(out, push_to_hub)}")
    return report


def finish_output(
    tmp: Path, out: Path, report: dict[str, Any], inputs: Inputs, save_model: bool, config_yaml: str | None
) -> None:
    """The merge's output once merged and scored (`tmp`, renamed to `out` afterwards): the diagnostics, model
    cards (or the body removed when not kept), the config that reproduces it and the report files."""
    from fmn_pl.report import write_report

    report["diagnostics"] = diagnostics(inputs, report)  # task vectors, Fisher scale, prediction shares
    if save_model:
        write_cards(tmp, report, inputs.metadata[0].base_model, out if config_yaml is not None else None)
    else:
        (tmp / BODY_FILE).unlink()
        for task in inputs.tasks:
            shutil.rmtree(tmp / task)
    report |= {"peak_rss_mb": peak_rss_mb(), "versions": _versions()}
    if config_yaml is not None:
        (tmp / "config.yaml").write_text(config_yaml)
    write_report(tmp, report)


def write_cards(folder: Path, report: dict[str, Any], base_model: str, out: Path | None) -> None:
    """A model card (README.md) in the merged body's folder and in each task's, from the report (`out`: the final
    output folder, whose config.yaml reproduces the merge; None: no config was saved)."""
    from fmn_pl.model_card import merged_card, write_card

    command = None if out is None else f"fmn-pl merge --config {out / 'config.yaml'}"
    write_card(folder, merged_card(report, base_model, report["tasks"], command))
    for task in report["tasks"]:
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


def done_line(name: str, out: Path, report: dict[str, Any]) -> str:
    """The merge's last line on the console: its mean scores, or its time when it did not evaluate."""
    if "summary" not in report:
        return f"{name}: merged in {report['timings']['merge_s']:.1f} s; output: {out}"
    s = report["summary"]
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
    return (
        f"{name}: mean score {fmt(s['merged_score'])} (average {fmt(s['average_score'])}, individual "
        f"{fmt(s['individual_score'])}); report: {out / 'report.md'}"
    )


def resolve_selection_split(split: str, metadata: list[CheckpointMeta]) -> Literal["holdout", "validation", "train"]:
    """`auto` -> holdout when every checkpoint held training rows out, else validation; other splits unchanged."""
    if split in ("holdout", "validation", "train"):
        return split  # type: ignore[return-value]  # narrowed by the test above
    if split != "auto":
        raise ValueError(f"selection_split must be auto, holdout, validation or train, got {split!r}")
    held = all(m.holdout_samples > 0 for m in metadata)
    return "holdout" if held else "validation"


def merge_body(
    checkpoints: Sequence[str | Path],
    method: MergeMethod,
    base: str | None = None,
    data_dir: str = "../shared/data/glue",
    selection_split: Literal["auto", "holdout", "validation", "train"] = "auto",
    selection_samples: int | None = None,
    batch_size: int = 64,
    accelerator: str = "auto",
    selection: Any = None,
    notes: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    own_tensors: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """The merged body {key: tensor} (in the checkpoints' dtypes) held in memory: `run_merge`'s checks and
    context without files or evaluation, for studies of many merges (score it with `Evaluator.evaluate(body=)`).

    `selection`: an `Evaluator` whose checkpoints cover these tasks, reused (with its tokenized data) by methods
    that choose options; default a new one on `selection_split`. `notes` (a dict) receives the method's notes
    (chosen lambda, ...). Methods that serve each task its own body (TALL) are refused. Tensors matching
    `own_tensors` are left out of the body, so `Evaluator.evaluate(body=)` scores each task with its own.
    """
    from fmn_pl.evaluate import EvalData

    if type(method).task_body is not MergeMethod.task_body:
        raise ValueError(f"method {method_name(method)} gives each task its own body: use run_merge, not merge_body")
    inputs = check_inputs(checkpoints, method, base, own_tensors)
    if selection is None:
        split = resolve_selection_split(selection_split, inputs.metadata)
        chooser = Selection.over(inputs, EvalData(data_dir, split, selection_samples, batch_size), accelerator)
    else:
        chooser = Selection(selection, inputs.tasks)
    ctx = inputs.context(
        evaluate=chooser.scores,
        selection_inputs=chooser.inputs,
        accelerator=accelerator,
        progress=False,
        log=log or log_line,
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
