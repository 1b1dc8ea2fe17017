"""Model cards: a README.md with the Hub's metadata (base model, tags, datasets, model-index scores) in every task
checkpoint and merged folder, so that the Hub and `huggingface_hub.ModelCard` read what `fmn_pl.json` records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fmn_pl.files import atomic_write
from fmn_pl.tasks import get_task

if TYPE_CHECKING:
    from fmn_pl.merge_report import MergeReport

CARD_FILE = "README.md"
DATASET = "nyu-mll/glue"

# fmn-pl's metric names -> the Hub's metric types (its `metrics` ids); `mse` is STS-B's scale check.
HUB_METRICS = {
    "accuracy": "accuracy",
    "f1": "f1",
    "matthews": "matthews_correlation",
    "pearson": "pearsonr",
    "spearman": "spearmanr",
    "mse": "mse",
}

# The logged prefix of a checkpoint's metrics (`val/`, `val_holdout/`, ...) -> the split it was measured on.
SPLITS = {"val": "validation", "val_validation": "validation", "val_holdout": "holdout", "": "validation"}


def eval_results(task: str, metrics: dict[str, Any], constant: dict[str, Any] | None = None) -> list[Any]:
    """The model-index entries of one task's `metrics` ({"val/accuracy": 0.84, ...} or {"accuracy": ...}), each
    followed by the constant prediction's value of the same metric (`<type>_constant`) when `constant` has it."""
    from huggingface_hub import EvalResult

    spec = get_task(task)
    out = []
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/")
        if name not in (*spec.metrics, "mse") or not isinstance(value, (int, float)):
            continue
        split = SPLITS.get(prefix, prefix.removeprefix("val_").replace("matched", "validation_matched"))
        where: dict[str, Any] = {
            "task_type": "text-classification",
            "dataset_type": DATASET,
            "dataset_name": f"GLUE {spec.tsv_dir}",
            "dataset_config": spec.name,
            "dataset_split": split,
        }
        out.append(EvalResult(**where, metric_type=HUB_METRICS[name], metric_name=name, metric_value=round(value, 4)))
        if constant is not None and isinstance(constant.get(name), (int, float)):
            out.append(
                EvalResult(
                    **where,
                    metric_type=f"{HUB_METRICS[name]}_constant",
                    metric_name=f"{name} of the constant prediction",
                    metric_value=round(constant[name], 4),
                )
            )
    return out


def _card(name: str, base_model: str | list[str], tags: list[str], results: list[Any], fmn_pl: dict, body: str) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    relation: dict[str, Any] = {"base_model_relation": "merge"} if isinstance(base_model, list) else {}
    data = ModelCardData(
        model_name=name,
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=tags,
        datasets=[DATASET],
        eval_results=results or None,
        fmn_pl=fmn_pl,
        **relation,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def checkpoint_card(meta: Any, name: str, command: str | None, base_fingerprint: str | None) -> Any:
    """The card of a fine-tuned task checkpoint (`meta`: its `CheckpointMeta`), with the command that made it and
    the pretrained model's weight fingerprint (None: a hub name)."""
    info = {
        "task": meta.task,
        "fingerprint": meta.fingerprint,
        "inputs": {"base_model": meta.base_model, "base_fingerprint": base_fingerprint},
        "epoch": meta.epoch,
        "seed": meta.seed,
        "num_train_examples": meta.num_train_examples,
        "data": meta.data.to_dict(),
        "model": meta.model_hparams.to_dict(),
        "command": command,
    }
    scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(meta.metrics.items()) if isinstance(v, (int, float)))
    body = (
        f"# {name}\n\n{meta.base_model} fine-tuned on GLUE {get_task(meta.task).tsv_dir} by "
        f"[fmn-pl](https://github.com/) (epoch {meta.epoch}, seed {meta.seed}, {meta.num_train_examples} training "
        f"examples).\n\nScores of the exported epoch: {scores or 'none logged'}.\n\n"
        f"Reproduce: `{command or 'see fmn_pl.json'}`. Weight fingerprint (sha256 of model*.safetensors): "
        f"`{meta.fingerprint}`.\n"
    )
    return _card(
        name, meta.base_model, ["fmn-pl", "glue", meta.task], eval_results(meta.task, meta.metrics), info, body
    )


def merged_card(report: MergeReport, base_model: str, tasks: Sequence[str], command: str | None) -> Any:
    """The card of a merged model (the body, or one task's folder: `tasks` is then that task) from the merge's
    `report`: its inputs as base models (relation `merge`), method, options, choices and each task's scores."""
    inputs = [c.path for c in report.checkpoints]
    info = {
        "method": report.method,
        "label": report.name,
        "options": report.options,
        "choices": {k: choice.chosen for k, choice in report.chosen().items()},
        "tasks": list(report.tasks),
        "inputs": [{"task": c.task, "path": c.path, "fingerprint": c.fingerprint} for c in report.checkpoints],
        "base": None if report.base is None else report.base.to_dict(),
        "command": command,
    }
    results = report.results
    evals = [
        e
        for t in tasks
        if t in results and results[t].merged
        for e in eval_results(t, results[t].merged or {}, results[t].baseline)
    ]
    columns = ("merged", "individual", "average", "baseline")
    lines = [
        f"| {t} | " + " | ".join(_pct(results[t].score(m) if t in results else None) for m in columns) + " |"
        for t in tasks
    ]
    body = (
        f"# {' + '.join(report.tasks or tasks)}: {report.name}\n\n"
        f"The bodies of {len(inputs)} fine-tuned {base_model} checkpoints merged by fmn-pl's `{report.method}` "
        f"(options {info['options']}; chosen on selection data: {info['choices'] or 'nothing'}).\n\n"
        "| task | merged | individual | plain average | constant |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(lines)
        + f"\n\nScores: the task's GLUE metrics averaged, in percent. Reproduce: `{command or 'see config.yaml'}`.\n"
    )
    return _card(report.name, [base_model, *inputs], ["fmn-pl", "merge", report.method, *tasks], evals, info, body)


def _pct(score: float | None) -> str:
    return "n/a" if score is None else f"{100 * score:.1f}"


def write_card(folder: str | Path, card: Any) -> Path:
    """Write `card` as folder/README.md, whole or not at all (no weight file changes: fingerprints stay)."""
    return atomic_write(Path(folder) / CARD_FILE, str(card))


def check_hub_token() -> None:
    """Refuse `push_to_hub` before any work when no Hugging Face token is set."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise ValueError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def push(folder: Path, repo_id: str) -> str:
    """Upload the merge's output folder to the Hub model repo `repo_id` (created if absent); its address."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"fmn-pl merge: {folder.name}")
    return f"https://huggingface.co/{repo_id}"
