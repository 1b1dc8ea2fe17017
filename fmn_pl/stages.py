"""The pipeline's stages: what each one runs (planned from the config) and what it depends on (its key over
the identities of its inputs), so a rerun knows what is up to date from the stamps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from fmn_pl.files import sha256_file, sha256_json
from fmn_pl.fit_config import DataOptions, ExportOptions, FitConfig, ModelOptions
from fmn_pl.kinds import KINDS
from fmn_pl.pipeline_config import (
    Launch,
    MethodSpec,
    PipelineConfig,
    artifact_kinds,
    artifact_options,
    build_method,
    combinations,
    fit_options,
)

# ---------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One unit of work: a call of a stage function (`run_fit`, `run_fisher`, `run_merge`, the report) on its typed
    config, whose inputs and outputs the pipeline tracks."""

    id: str
    """e.g. "fit/rte", "fisher/rte/mask_fisher", "merge/rte+mrpc/fmn", "report"."""
    kind: str
    """fit, fisher, merge or report."""
    deps: list[str]
    """Stage ids whose outputs it reads."""
    options: dict[str, Any]
    """Everything that decides its result besides `deps`, as data (hashed into the stamp key)."""
    config: Any
    """The stage function's typed config: a `FitConfig`, a `FisherConfig`, a `MergeConfig`
    (None: the report)."""
    launch: Optional[Launch]
    """Where it runs (None: in the pipeline's process, rank 0 only)."""
    output: Path
    """Its main output: checkpoint folder, artifact file or report file."""
    config_file: Optional[Path] = None
    """Where `config` is written as YAML before it runs: `fmn-pl <kind> --config <config_file>` runs it alone."""

    def command(self) -> list[str]:
        """The standalone command line of this stage (what a cluster job would run)."""
        return ["fmn-pl", self.kind, "--config", str(self.config_file)] if self.config_file else ["fmn-pl", self.kind]


def _launch(cfg: PipelineConfig, own: Optional[Launch]) -> Launch:
    return own if own is not None else cfg.trainer


def set_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that are set: None means the stage function's default."""
    return {k: v for k, v in options.items() if v is not None}


def fit_config(cfg: PipelineConfig, task: str) -> FitConfig:
    """One task's fine-tuning (written to <output>/configs/fit-<task>.yaml).

    The exported epoch is picked on the held-out training rows (`holdout_samples`), never on validation: the
    validation rows are read only for the final scores. Without held-out rows the last epoch is exported and
    no evaluation runs during fine-tuning."""
    o = fit_options(cfg, task)
    out = Path(cfg.output)
    held = bool(o["holdout_samples"])
    return FitConfig(
        seed_everything=o["seed"],
        model=ModelOptions(
            model_name_or_path=cfg.model,
            learning_rate=o["learning_rate"],
            weight_decay=o["weight_decay"],
            warmup_ratio=o["warmup_ratio"],
        ),
        data=DataOptions(
            task=task,
            data_dir=cfg.data_dir,
            batch_size=o["batch_size"],
            max_length=o["max_length"],
            max_train_samples=o["max_train_samples"],
            max_eval_samples=o["max_eval_samples"],
            holdout_samples=o["holdout_samples"],
            sample_seed=o["seed"],
            eval_splits=["holdout"] if held else None,
        ),
        trainer={
            "max_epochs": o["max_epochs"],
            "limit_val_batches": None if held else 0,  # no held-out rows: nothing is read to pick an epoch
            "precision": o["precision"],
            "enable_checkpointing": False,  # the export keeps the best epoch's weights in memory
            "enable_progress_bar": False,  # the stage's output goes to a log file
            **set_options({k: o[k] for k in ("accumulate_grad_batches", "gradient_clip_val")}),  # unset: not in the key
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out / "logs"), "name": f"fit-{task}", "version": "latest"},
            },
        },
        export=ExportOptions(dirpath=str(out / "checkpoints" / task), select="best" if held else "last"),
    )


# The fit options a pipeline sets: what a fit stage's key hashes, in the shape it has always had (existing fits stay
# up to date; the options a pipeline cannot set keep their defaults).
FIT_KEY = {
    "model": ("model_name_or_path", "learning_rate", "weight_decay", "warmup_ratio"),
    "data": (
        "task",
        "data_dir",
        "batch_size",
        "max_length",
        "max_train_samples",
        "max_eval_samples",
        "holdout_samples",
        "sample_seed",
        "eval_splits",
    ),
    "export": ("dirpath", "select"),
}


def fit_key(config: FitConfig) -> dict[str, Any]:
    """The key data of a pipeline's fit config (`FIT_KEY`), before its launch options are set."""
    data = config.to_data()
    return {
        "seed_everything": config.seed_everything,
        **{section: {k: data[section][k] for k in keys} for section, keys in FIT_KEY.items()},
        "trainer": config.trainer,
    }


def config_path(cfg: PipelineConfig, stage_id: str) -> Path:
    """Where a stage's options are written as YAML, e.g. <output>/configs/fit-rte.yaml."""
    return Path(cfg.output) / "configs" / f"{stage_id.replace('/', '-')}.yaml"


def report_options(cfg: PipelineConfig) -> dict[str, Any]:
    """What the combined report shows besides the merges' results: columns, combinations and the caps."""
    kinds = artifact_kinds(cfg)
    return {
        "model": cfg.model,
        "data_dir": cfg.data_dir,
        "tasks": cfg.tasks,
        "combinations": ["+".join(c) for c in combinations(cfg)],
        "columns": [{"label": m.column, "method": m.name, "options": m.options} for m in cfg.merge.methods],
        "caps": {
            "fit": {
                t: {
                    k: fit_options(cfg, t)[k]
                    for k in ("max_train_samples", "max_eval_samples", "max_epochs", "holdout_samples")
                }
                for t in cfg.tasks
            },
            "fisher": {k: {"num_examples": artifact_options(cfg, k).num_examples} for k in kinds},  # None: default
            "eval": {"max_eval_samples": cfg.merge.eval.max_samples},
        },
    }


def plan(cfg: PipelineConfig) -> list[Stage]:
    """Every stage of the pipeline, in an order where each stage follows the stages it reads."""
    stages = [fit_stage(cfg, task) for task in cfg.tasks]
    kinds = artifact_kinds(cfg)
    stages += [fisher_stage(cfg, task, kind) for task in cfg.tasks for kind in kinds]
    for combo in combinations(cfg):
        for spec in cfg.merge.methods:
            stages.append(merge_stage(cfg, combo, spec))
    stages.append(
        Stage(  # reads the merges' reports and every stage's stamp (its cost)
            id="report",
            kind="report",
            deps=[s.id for s in stages],
            options={"report": report_options(cfg)},
            config=None,
            launch=None,
            output=Path(cfg.output) / "report.json",
        )
    )
    return stages


def fit_stage(cfg: PipelineConfig, task: str) -> Stage:
    """Fine-tuning of one task: `run_fit` on the `FitConfig` the pipeline generates (`fit_config`)."""
    conf = fit_config(cfg, task)
    launch = _launch(cfg, cfg.fit.launch)
    return Stage(
        id=f"fit/{task}",
        kind="fit",
        deps=[],
        options={"config": fit_key(conf), "args": {}},  # "args": the key's shape before the typed options
        config=replace(conf, trainer={**conf.trainer, **asdict(launch)}),
        launch=launch,
        output=Path(cfg.output) / "checkpoints" / task,
        config_file=config_path(cfg, f"fit/{task}"),
    )


def fisher_stage(cfg: PipelineConfig, task: str, kind: str) -> Stage:
    """One artifact of one task's checkpoint: `run_fisher` on a `FisherConfig`."""
    from fmn_pl.kinds import fisher_config_class

    a = artifact_options(cfg, kind)
    checkpoint = Path(cfg.output) / "checkpoints" / task
    opts = {
        "checkpoint": str(checkpoint),
        "task": task,
        "kind": KINDS[kind].cli,
        "data_dir": cfg.data_dir,
        "num_examples": a.num_examples,
        "seed": a.seed,
        "batch_size": a.batch_size,
        **{o.name: getattr(a, o.name) for o in KINDS[kind].options},
    }
    launch = _launch(cfg, cfg.fisher.launch)
    return Stage(
        id=f"fisher/{task}/{kind}",
        kind="fisher",
        deps=[f"fit/{task}"],
        options=opts,
        config=fisher_config_class()(**set_options(opts), trainer=asdict(launch)),  # None: the stage's default
        launch=launch,
        output=checkpoint / KINDS[kind].file,
        config_file=config_path(cfg, f"fisher/{task}/{kind}"),
    )


def merge_stage(cfg: PipelineConfig, combo: list[str], spec: MethodSpec) -> Stage:
    """One method on one task set: `run_merge` on a `MergeConfig` (always in the pipeline's process: merging is one
    process) with a method instance of its own (methods keep state between `setup` and `merge`). Its key hashes
    the config but where it runs."""
    from fmn_pl.merge_config import RUN_OPTIONS, MergeConfig

    method = build_method(spec)
    name = "+".join(combo)
    out = Path(cfg.output)
    folder = out / "merges" / name / spec.column
    config = MergeConfig(
        checkpoints=[str(out / "checkpoints" / t) for t in combo],
        method=method,
        output=str(folder),
        base=cfg.model if "base" in method.needs else None,
        data_dir=cfg.data_dir,
        label=spec.column,
        own_tensors=cfg.merge.own_tensors,
        save_model=cfg.merge.save_model,
        batch_size=cfg.merge.batch_size,
        selection=cfg.merge.selection,
        eval=cfg.merge.eval,
        accelerator=cfg.merge.accelerator or cfg.trainer.accelerator,
        overwrite=True,
        progress=False,
    )
    deps = [f"fit/{t}" for t in combo]
    deps += [f"fisher/{t}/{k}" for t in combo for k in KINDS if k in method.needs]
    data = config.to_data()
    return Stage(
        id=f"merge/{name}/{spec.column}",
        kind="merge",
        deps=deps,
        options={**{k: v for k, v in data.items() if k not in RUN_OPTIONS}, "tasks": combo},
        config=config,
        launch=None,
        output=folder / "report.json",
        config_file=config_path(cfg, f"merge/{name}/{spec.column}"),
    )


# ---------------------------------------------------------------------------------------------- identities


class Identities:
    """Content identities of inputs and outputs, each computed at most once per run."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def _memo(self, key: str, fn: Callable[[], str]) -> str:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def model(self, name_or_path: str) -> str:
        """Local model folder: its weights' fingerprint (or its config's hash); hub name: the name."""
        from fmn_pl.checkpoint import weights_fingerprint
        from fmn_pl.options import is_local_path

        if not is_local_path(name_or_path):
            return f"hub:{name_or_path}"

        def compute() -> str:
            path = Path(name_or_path).expanduser()
            try:
                return weights_fingerprint(path)
            except FileNotFoundError:
                files = sorted(p for p in path.iterdir() if p.is_file())
                return sha256_json({p.name: sha256_file(p) for p in files})

        return self._memo(f"model:{name_or_path}", compute)

    def data(self, data_dir: str, task: str) -> str:
        """Local data: hashes of the task's split files; hub dataset: its name."""
        from fmn_pl.options import is_local_path
        from fmn_pl.sources import split_file
        from fmn_pl.tasks import get_task

        if not is_local_path(data_dir):
            return f"hub:{data_dir}/{task}"

        def compute() -> str:
            spec = get_task(task)
            files = {s: split_file(data_dir, spec, s) for s in ("train", *spec.eval_splits)}
            return sha256_json({s: sha256_file(p) for s, p in files.items()})

        return self._memo(f"data:{data_dir}:{task}", compute)

    def output(self, stage: Stage) -> Optional[str]:
        """The identity of what `stage` wrote, or None when it is absent or incomplete."""
        from fmn_pl.checkpoint import METADATA_FILE, weights_fingerprint

        path = stage.output
        if stage.kind == "fit":
            if not (path / METADATA_FILE).is_file():
                return None
            try:
                return self._memo(f"out:{path}", lambda: weights_fingerprint(path))
            except FileNotFoundError:
                return None
        if not path.is_file():
            return None
        return self._memo(f"out:{path}", lambda: sha256_file(path))

    def forget(self, stage: Stage) -> None:
        self._cache.pop(f"out:{stage.output}", None)


def stage_key(stage: Stage, cfg: PipelineConfig, ids: Identities, done: dict[str, str]) -> str:
    """Hash of everything the stage's result depends on: options, upstream outputs, model and data."""
    inputs: dict[str, Any] = {dep: done[dep] for dep in stage.deps}
    if stage.kind == "fit":
        inputs["model"] = ids.model(cfg.model)
    if stage.kind in ("fit", "fisher"):
        task = stage.id.split("/")[1]
        inputs["data"] = ids.data(cfg.data_dir, task)
    if stage.kind == "merge":
        inputs["data"] = {t: ids.data(cfg.data_dir, t) for t in stage.options["tasks"]}
        if stage.options["base"] is not None:
            inputs["base"] = ids.model(cfg.model)
    return sha256_json({"stage": stage.id, "options": stage.options, "inputs": inputs})


def freshness(
    stage: Stage, cfg: PipelineConfig, ids: Identities, done: dict[str, str], forced: bool = False
) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(key, output identity, why it must run): `why` is None when the stage is up to date."""
    missing = [d for d in stage.deps if d not in done]
    key = None if missing else stage_key(stage, cfg, ids, done)
    stamp = read_stamp(stamp_path(cfg, stage))
    current = ids.output(stage)
    if missing:
        why = f"after {', '.join(missing)}" if len(missing) <= 4 else f"after {len(missing)} unfinished stages"
    elif stamp is None:
        why = "first run" if current is None else "output not stamped: interrupted, or written outside the pipeline"
    elif stamp.get("key") != key:
        why = "options changed" if sha256_json(stamp.get("options")) != sha256_json(stage.options) else "inputs changed"
    elif current is None or stamp.get("output") != current:
        why = "its output is missing or changed"
    elif forced:
        why = "--rerun"
    else:
        why = None
    return key, current, why


def stamp_path(cfg: PipelineConfig, stage: Stage) -> Path:
    return Path(cfg.output) / "stamps" / (stage.id.replace("/", "__") + ".json")


def read_stamp(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
