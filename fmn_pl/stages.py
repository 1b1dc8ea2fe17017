"""The pipeline's stages: what each one runs (planned from the config) and what it depends on (its key over
the identities of its inputs), so a rerun knows what is up to date from the stamps."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fmn_pl.kinds import KINDS
from fmn_pl.pipeline_config import (
    ArtifactOptions,
    Launch,
    PipelineConfig,
    artifact_kinds,
    artifact_options,
    combinations,
    fit_options,
    resolve_method,
)

# ---------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One unit of work: a stage CLI call whose inputs and outputs the pipeline tracks."""

    id: str
    """e.g. "fit/rte", "fisher/rte/mask_fisher", "merge/rte+mrpc/fmn", "report"."""
    kind: str
    """fit, fisher, merge or report."""
    deps: list[str]
    """Stage ids whose outputs it reads."""
    options: dict[str, Any]
    """Everything that decides its result besides `deps` (hashed into the stamp key)."""
    argv: list[str]
    """Arguments of `fmn-pl <kind>` (launch options not included)."""
    launch: Optional[Launch]
    """Where it runs (None: in the pipeline's process, rank 0 only)."""
    output: Path
    """Its main output: checkpoint folder, artifact file or report file."""
    files: dict[str, str] = field(default_factory=dict)
    """Files to write before running (name -> text), e.g. the generated fit config."""

    def command(self) -> list[str]:
        """The standalone command line of this stage (what a cluster job would run)."""
        launch = self.launch.argv() if self.launch else []
        return ["fmn-pl", self.kind, *self.argv, *launch]


def _launch(cfg: PipelineConfig, own: Optional[Launch]) -> Launch:
    return own if own is not None else cfg.trainer


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _flags(options: dict[str, Any]) -> list[str]:
    """`--key=value` for every option that is set. None means: leave the stage's default, except for a merge
    method's own options, where null is a value (`scaling: null`: choose it on held-out rows)."""
    return [f"--{k}={_value(v)}" for k, v in options.items() if v is not None or k.startswith("method.")]


def fit_config(cfg: PipelineConfig, task: str) -> dict[str, Any]:
    """The LightningCLI config of one task's fine-tuning (written to <output>/configs/fit-<task>.yaml)."""
    o = fit_options(cfg, task)
    out = Path(cfg.output)
    return {
        "seed_everything": o["seed"],
        "model": {
            "model_name_or_path": cfg.model,
            "learning_rate": o["learning_rate"],
            "weight_decay": o["weight_decay"],
            "warmup_ratio": o["warmup_ratio"],
        },
        "data": {
            "task": task,
            "data_dir": cfg.data_dir,
            "batch_size": o["batch_size"],
            "max_length": o["max_length"],
            "max_train_samples": o["max_train_samples"],
            "max_eval_samples": o["max_eval_samples"],
            "holdout_samples": o["holdout_samples"],
            "sample_seed": o["seed"],
        },
        "trainer": {
            "max_epochs": o["max_epochs"],
            "precision": o["precision"],
            "enable_checkpointing": False,  # the export keeps the best epoch's weights in memory
            "enable_progress_bar": False,  # the stage's output goes to a log file
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out / "logs"), "name": f"fit-{task}", "version": "latest"},
            },
        },
        "export": {"dirpath": str(out / "checkpoints" / task), "select": "best"},
    }


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
            "eval": {"max_eval_samples": cfg.merge.max_eval_samples},
        },
    }


def plan(cfg: PipelineConfig) -> list[Stage]:
    """Every stage of the pipeline, in an order where each stage follows the stages it reads."""
    import yaml

    from fmn_pl.artifacts import artifact_path

    out = Path(cfg.output)
    stages: list[Stage] = []
    for task in cfg.tasks:
        conf = fit_config(cfg, task)
        path = out / "configs" / f"fit-{task}.yaml"
        argv = ["--config", str(path), *_flags(cfg.fit.args)]
        stages.append(
            Stage(
                id=f"fit/{task}",
                kind="fit",
                deps=[],
                options={"config": conf, "args": cfg.fit.args},
                argv=argv,
                launch=_launch(cfg, cfg.fit.launch),
                output=out / "checkpoints" / task,
                files={str(path): yaml.safe_dump(conf, sort_keys=False)},
            )
        )
    kinds = artifact_kinds(cfg)
    for task in cfg.tasks:
        for kind in kinds:
            a: ArtifactOptions = artifact_options(cfg, kind)
            opts = {
                "checkpoint": str(out / "checkpoints" / task),
                "task": task,
                "kind": KINDS[kind].cli,
                "data_dir": cfg.data_dir,
                "num_examples": a.num_examples,
                "seed": a.seed,
                "batch_size": a.batch_size,
            }
            opts.update({name: getattr(a, name) for name in KINDS[kind].options})
            opts.update(a.args)
            stages.append(
                Stage(
                    id=f"fisher/{task}/{kind}",
                    kind="fisher",
                    deps=[f"fit/{task}"],
                    options=opts,
                    argv=_flags(opts),
                    launch=_launch(cfg, cfg.fisher.launch),
                    output=artifact_path(out / "checkpoints" / task, kind),
                )
            )
    methods = {spec.column: resolve_method(spec.name, spec.options) for spec in cfg.merge.methods}
    for combo in combinations(cfg):
        name = "+".join(combo)
        for spec in cfg.merge.methods:
            needs, resolved = methods[spec.column]
            folder = out / "merges" / name / spec.column
            opts: dict[str, Any] = {
                "method": spec.name,
                **{f"method.{k}": v for k, v in spec.options.items()},
                "label": spec.column,
                "base": cfg.model if "base" in needs else None,
                "data_dir": cfg.data_dir,
                "max_eval_samples": cfg.merge.max_eval_samples,
                "save_model": cfg.merge.save_model,
                **cfg.merge.args,
            }
            run = {"accelerator": cfg.merge.accelerator or cfg.trainer.accelerator, "progress": False}
            argv = [
                *_flags({**opts, **run}),
                "--checkpoints",
                *(str(out / "checkpoints" / t) for t in combo),
                "--output",
                str(folder),
                "--overwrite=true",
            ]
            deps = [f"fit/{t}" for t in combo]
            deps += [f"fisher/{t}/{k}" for t in combo for k in KINDS if k in needs and k in kinds]
            stages.append(
                Stage(
                    id=f"merge/{name}/{spec.column}",
                    kind="merge",
                    deps=deps,
                    options={**opts, "tasks": combo, "resolved": resolved},
                    argv=argv,
                    launch=None,
                    output=folder / "report.json",
                )
            )
    stages.append(
        Stage(  # reads the merges' reports and every stage's stamp (its cost)
            id="report",
            kind="report",
            deps=[s.id for s in stages],
            options={"report": report_options(cfg)},
            argv=[],
            launch=None,
            output=out / "report.json",
        )
    )
    return stages


# ---------------------------------------------------------------------------------------------- identities


def sha256_file(path: Path) -> str:
    """sha256 (first 16 hex digits) of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                return hash_json({p.name: sha256_file(p) for p in files})

        return self._memo(f"model:{name_or_path}", compute)

    def data(self, data_dir: str, task: str) -> str:
        """Local data: hashes of the task's split files; hub dataset: its name."""
        from fmn_pl.data import is_local_path, split_file
        from fmn_pl.tasks import get_task

        if not is_local_path(data_dir):
            return f"hub:{data_dir}/{task}"

        def compute() -> str:
            spec = get_task(task)
            files = {s: split_file(data_dir, spec, s) for s in ("train", *spec.eval_splits)}
            return hash_json({s: sha256_file(p) for s, p in files.items()})

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
    return hash_json({"stage": stage.id, "options": stage.options, "inputs": inputs})


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
        why = "not run yet" if current is None else "not stamped (interrupted or run outside the pipeline)"
    elif stamp.get("key") != key:
        why = "options or inputs changed"
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
