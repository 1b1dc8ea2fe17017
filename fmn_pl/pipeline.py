"""`fmn-pl pipeline`: fine-tune, compute artifacts, merge, evaluate and report from one config, resumably.

The pipeline runs the stage CLIs in order, with options it generates from its own config:

    fit/<task>               fmn-pl fit     -> <output>/checkpoints/<task>/           (task checkpoint)
    fisher/<task>/<kind>     fmn-pl fisher  -> <output>/checkpoints/<task>/<kind>.safetensors
    merge/<combo>/<label>    fmn-pl merge   -> <output>/merges/<combo>/<label>/report.json, merged body
    report                   combined JSON, Markdown table and plots -> <output>/report.*, <output>/plots/

Resume: after a stage succeeds its stamp `<output>/stamps/<stage>.json` is written last, atomically. It
holds a key (a hash of the stage's options and of the identities of everything it read: checkpoint
weight fingerprints, artifact and report hashes, base model and data files) and the identity of what it
wrote. A rerun skips a stage whose stamp has the same key and whose outputs still match; a stage being
recomputed loses its stamp first, so an interrupted stage is never mistaken for a finished one.
Where a stage ran (devices, nodes, strategy) and the code version are not part of the key.

Stages with one process run inside the pipeline's process; a stage with more devices or nodes, or a
DDP-like strategy, runs as its own `python -m fmn_pl.cli <stage>` process so Lightning's launcher
starts its ranks exactly as it does for a standalone stage. Under srun or torchrun (one pipeline per
rank), every rank runs the multi-process stages; single-process stages (merges, the report, and any
stage with one device) run on global rank 0 only. Merging and evaluation are always one process.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

from fmn_pl.checkpoint import write_json
from fmn_pl.resources import peak_rss_mb, reset_peak

ARTIFACT_KINDS = {"mask_fisher": "mask", "full_fisher": "full", "grams": "grams"}  # artifact kind -> --kind
STAGE_KINDS = ("fit", "fisher", "merge", "report")


# ---------------------------------------------------------------------------------------------- config


@dataclass
class Launch:
    """Where a stage runs: given to every stage as Lightning's own `--trainer.*` options."""

    accelerator: str = "auto"
    """Lightning accelerator: "cpu", "gpu", "auto", ..."""
    devices: Union[int, str] = 1
    """Devices per node. More than 1 runs the stage in its own process, launched by Lightning (DDP)."""
    num_nodes: int = 1
    """Nodes per stage. Several nodes need an external launcher that starts one pipeline per device
    (srun --ntasks-per-node=devices, torchrun --nproc_per_node=devices); see examples/."""
    strategy: str = "auto"
    """Lightning strategy: "auto", "ddp", ... (a DDP-like strategy runs the stage in its own process)."""

    def argv(self) -> list[str]:
        return [f"--trainer.{f.name}={getattr(self, f.name)}" for f in fields(self)]

    def world(self) -> int:
        """Processes this stage needs (-1 when Lightning decides: `devices: auto` or a device list)."""
        try:
            return int(self.devices) * int(self.num_nodes)
        except (TypeError, ValueError):
            return -1

    def in_process(self) -> bool:
        """True when the stage needs no launcher: one process, no distributed strategy."""
        return self.world() == 1 and str(self.strategy) in ("auto", "single_device")


@dataclass
class FitOptions:
    """Fine-tuning of one model per task (`fmn-pl fit`; see `configs/fit/*.yaml` for the stage alone)."""

    learning_rate: float = 2e-5
    """Peak AdamW learning rate (linear warm-up, then linear decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm weights)."""
    warmup_ratio: float = 0.1
    """Fraction of the training steps spent warming the learning rate up."""
    max_epochs: int = 3
    """Training epochs; the epoch with the best validation score is exported."""
    batch_size: int = 32
    """Training batch size (per device)."""
    max_length: Optional[int] = None
    """Truncation length (default: the task's, 64 for single sentences, 128 for pairs)."""
    max_train_samples: Optional[int] = None
    """Cap on training examples (a seeded sample without replacement); None: the whole split."""
    max_eval_samples: Optional[int] = None
    """Cap on the validation examples scored after each epoch (to pick the exported epoch)."""
    holdout_samples: int = 0
    """Training rows held out (never trained on) for merge methods that choose options on data."""
    seed: int = 42
    """`seed_everything` seed of the fine-tuning run (also the data sampling seed)."""
    precision: str = "32-true"
    """Lightning precision ("32-true", "bf16-mixed", "16-mixed", ...)."""
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-task overrides of the options above, e.g. {rte: {learning_rate: 3.0e-5, max_epochs: 10}}."""
    args: dict[str, Any] = field(default_factory=dict)
    """Further `fmn-pl fit` options, by their dotted name, e.g. {"trainer.accumulate_grad_batches": 2}."""
    launch: Optional[Launch] = None
    """Where this stage runs (default: the pipeline's `trainer`)."""


@dataclass
class ArtifactOptions:
    """How one artifact kind is computed (`fmn-pl fisher --kind ...`)."""

    num_examples: Optional[int] = None
    """Training examples it reads (a seeded sample without replacement; None: the stage's default)."""
    aggregation: Optional[str] = None
    """Fisher only: "per_example" or "per_batch" (None: the stage's default)."""
    labels: Optional[str] = None
    """Fisher only: "empirical", "sampled" or "expected" (None: the stage's default)."""
    batch_size: Optional[int] = None
    """Batch size (None: the stage's default)."""
    seed: int = 0
    """Seed of the example sample (and of sampled labels)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Further `fmn-pl fisher` options, by name, e.g. {include_padding: true}."""


@dataclass
class FisherOptions:
    """Artifacts beside each task checkpoint: mask-node Fisher, full diagonal Fisher, Gram matrices."""

    kinds: Optional[list[Literal["mask_fisher", "full_fisher", "grams"]]] = None
    """Artifacts to compute; None: exactly those the merge methods need."""
    mask_fisher: ArtifactOptions = field(default_factory=ArtifactOptions)
    """Options of the mask-node Fisher (FMN's input)."""
    full_fisher: ArtifactOptions = field(default_factory=ArtifactOptions)
    """Options of the full diagonal Fisher (Fisher merging's input)."""
    grams: ArtifactOptions = field(default_factory=ArtifactOptions)
    """Options of the Gram matrices (RegMean's input)."""
    launch: Optional[Launch] = None
    """Where this stage runs (default: the pipeline's `trainer`)."""


@dataclass
class MethodSpec:
    """One merge method with its options: one column of the report."""

    name: str
    """Registered method name (see `fmn-pl merge --help`): average, fmn, fisher, task_arithmetic, ..."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's options, e.g. {broadcast: per_node}; checked against its signature."""
    label: Optional[str] = None
    """Column name in the report and folder name (default: `name`); set it to run a method twice."""

    @property
    def column(self) -> str:
        return self.label or self.name


@dataclass
class MergeOptions:
    """Merging, and the evaluation of every merged model on each task with that task's own head."""

    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("fmn")])
    """Methods to compare; the plain average and the individual models are always in the report."""
    combinations: Union[Literal["pairs", "all"], list[list[str]]] = "pairs"
    """Task sets to merge: "pairs" (every pair), "all" (all tasks at once) or explicit lists."""
    max_eval_samples: Optional[int] = None
    """Cap on the validation examples each task is scored on (a seeded sample); None: all."""
    save_model: bool = True
    """Keep each merged body on disk (turn off to save space on large sweeps)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Further `fmn-pl merge` options, by name, e.g. {batch_size: 128, selection_samples: 200}."""
    accelerator: Optional[str] = None
    """Accelerator of merging and evaluation (default: the pipeline's `trainer.accelerator`). A merge is one
    process: it runs on global rank 0 whatever `trainer.devices` says."""


@dataclass
class PipelineConfig:
    """fmn-pl pipeline: fine-tune one model per task, compute Fisher (and Gram) artifacts, merge, report."""

    output: str = "runs/pipeline"
    """Folder of everything the pipeline writes (checkpoints, merges, stamps, logs, report)."""
    model: str = "../shared/models/all-MiniLM-L6-v2"
    """Pretrained model: a local folder or a hub name (e.g. bert-base-uncased). Also the merges' base."""
    data_dir: str = "../shared/data/glue"
    """GLUE data: a local folder (nyu-mll/glue parquet or GLUE TSV layout) or a hub name (nyu-mll/glue)."""
    tasks: list[str] = field(default_factory=lambda: ["rte", "mrpc"])
    """GLUE tasks, one fine-tuned model each."""
    fit: FitOptions = field(default_factory=FitOptions)
    """Fine-tuning options."""
    fisher: FisherOptions = field(default_factory=FisherOptions)
    """Artifact options."""
    merge: MergeOptions = field(default_factory=MergeOptions)
    """Merge and evaluation options."""
    trainer: Launch = field(default_factory=Launch)
    """Where stages run, unless a stage sets its own `launch`: `--trainer.devices 4 --trainer.strategy ddp`."""


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> Any:
    """The `fmn-pl pipeline` parser: the config dataclasses plus per-invocation flags."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="fmn-pl pipeline",
        description="Fine-tune one model per GLUE task, compute Fisher/Gram artifacts, merge, evaluate and "
        "report, skipping every stage whose recorded inputs still match.",
        exit_on_error=False,  # one line at the CLI's error boundary, not the usage
    )
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML (see configs/pipeline/)")
    parser.add_class_arguments(PipelineConfig, None)
    parser.add_argument(
        "--dry_run",
        type=bool,
        default=False,
        help="check the model, the data and every stage's arguments, print which stages would run and why; "
        "compute and write nothing",
    )
    parser.add_argument(
        "--only",
        type=Optional[Union[list[str], str]],
        default=None,
        help="run only the stages matching these patterns, a list or comma-separated: e.g. fit/rte, fisher "
        "(every fisher stage), merge/*/fmn, report; the stages they read must be finished",
    )
    parser.add_argument(
        "--rerun",
        type=Union[list[str], str],
        default=[],
        help="recompute the stages matching these patterns (as --only) even when their stamps match",
    )
    return parser


def parse_config(argv: Sequence[str]) -> tuple[PipelineConfig, dict[str, Any]]:
    """(config, {dry_run, only, rerun}) from command-line arguments."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    flags = {k: ns.pop(k) for k in ("dry_run", "only", "rerun")}
    for k in ("only", "rerun"):  # a list, or one string of comma-separated patterns
        if isinstance(flags[k], str):
            flags[k] = [p.strip() for p in flags[k].split(",") if p.strip()]
    ns.pop("config", None)
    init = parser.instantiate_classes(ns) if hasattr(parser, "instantiate_classes") else parser.instantiate(ns)
    cfg = PipelineConfig(**{f.name: init[f.name] for f in fields(PipelineConfig)})
    return normalize(cfg), flags


COUNTS = ("max_epochs", "batch_size", "max_length", "max_train_samples", "max_eval_samples")


def check_counts(cfg: PipelineConfig) -> None:
    """Counts and sizes are positive integers (or null) before any stage runs, per-task overrides included: a
    negative cap would otherwise fail a stage minutes in, or mean "all but N"."""
    from fmn_pl.options import check_count

    for where, options in [("fit", vars(cfg.fit)), *((f"fit.per_task.{t}", o) for t, o in cfg.fit.per_task.items())]:
        for name in COUNTS:
            if name in options:
                check_count(f"{where}.{name}", options[name])
        if "holdout_samples" in options:
            check_count(f"{where}.holdout_samples", options["holdout_samples"], minimum=0)
    for kind in ARTIFACT_KINDS:
        a = getattr(cfg.fisher, kind)
        check_count(f"fisher.{kind}.num_examples", a.num_examples)
        check_count(f"fisher.{kind}.batch_size", a.batch_size)
    check_count("merge.max_eval_samples", cfg.merge.max_eval_samples)


def normalize(cfg: PipelineConfig) -> PipelineConfig:
    """Canonical task names, checked options and per-task overrides; errors name the bad value."""
    from fmn_pl.tasks import get_task

    tasks = [get_task(t).name for t in cfg.tasks]
    check_counts(cfg)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks lists a task twice: {cfg.tasks}")
    known = {f.name for f in fields(FitOptions)} - {"per_task", "args", "launch"}
    per_task = {}
    for t, over in cfg.fit.per_task.items():
        name = get_task(t).name
        if name not in tasks:
            raise ValueError(f"fit.per_task names task {t!r}, which is not in tasks {tasks}")
        bad = sorted(set(over) - known)
        if bad:
            raise ValueError(f"fit.per_task.{t}: unknown option(s) {bad}; expected some of {sorted(known)}")
        per_task[name] = dict(over)
    labels = [m.column for m in cfg.merge.methods]
    dup = sorted({c for c in labels if labels.count(c) > 1})
    if dup:
        raise ValueError(f"merge.methods: column(s) {dup} appear twice; give each a distinct `label`")
    bad = [c for c in labels if not c or "/" in c or c.startswith(".")]
    if bad:
        raise ValueError(f"merge.methods: label(s) {bad} cannot name a folder")
    for m in cfg.merge.methods:
        resolve_method(m.name, m.options)  # an unknown method fails here, with the known names
    return replace(cfg, tasks=tasks, fit=replace(cfg.fit, per_task=per_task))


def combinations(cfg: PipelineConfig) -> list[list[str]]:
    """The task sets to merge, in config order."""
    from fmn_pl.tasks import get_task

    combos = cfg.merge.combinations
    if combos == "pairs":
        if len(cfg.tasks) < 2:
            raise ValueError(f"merge.combinations 'pairs' needs at least two tasks, got {cfg.tasks}")
        return [list(c) for c in itertools.combinations(cfg.tasks, 2)]
    if combos == "all":
        if len(cfg.tasks) < 2:
            raise ValueError(f"merge.combinations 'all' needs at least two tasks, got {cfg.tasks}")
        return [list(cfg.tasks)]
    out = []
    for combo in combos:
        names = [get_task(t).name for t in combo]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"merge.combinations: {combo} must name at least two distinct tasks")
        missing = [t for t in names if t not in cfg.tasks]
        if missing:
            raise ValueError(f"merge.combinations: {combo} names {missing}, not in tasks {cfg.tasks}")
        out.append(names)
    return out


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


def artifact_kinds(cfg: PipelineConfig) -> list[str]:
    """The artifact kinds to compute: as configured, or those the merge methods need."""
    needed: list[str] = []
    for spec in cfg.merge.methods:
        needs, _ = resolve_method(spec.name, spec.options)
        needed += [k for k in ARTIFACT_KINDS if k in needs]
    if cfg.fisher.kinds is None:
        return list(dict.fromkeys(needed))
    missing = [k for k in needed if k not in cfg.fisher.kinds]
    if missing:
        raise ValueError(
            f"fisher.kinds {cfg.fisher.kinds} lacks {sorted(set(missing))}, which merge.methods need "
            "(leave fisher.kinds null to compute exactly what they need)"
        )
    return list(dict.fromkeys(cfg.fisher.kinds))


def resolve_method(name: str, options: dict[str, Any]) -> tuple[frozenset[str], dict[str, Any]]:
    """What merge method `name` with `options` needs (an instance's: options can change it, e.g. FMN's
    `scaling: null` needs the base model) and its resolved options as JSON (defaults filled in, so a changed
    default changes the merge stage's key). An unknown name fails here, with the known names; bad options give
    the class's needs and the given options, and the stage's argument check reports them with every other problem."""
    from fmn_pl.merging import method_class

    cls = method_class(name)
    try:
        method = cls(**options)
    except (TypeError, ValueError):
        return frozenset(cls.needs), dict(options)
    return frozenset(method.needs), json.loads(json.dumps(method.options(), default=str))


def fit_options(cfg: PipelineConfig, task: str) -> dict[str, Any]:
    """The fit options of one task: the shared ones with its per-task overrides applied."""
    base = {
        f.name: getattr(cfg.fit, f.name) for f in fields(FitOptions) if f.name not in ("per_task", "args", "launch")
    }
    return {**base, **cfg.fit.per_task.get(task, {})}


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
            a: ArtifactOptions = getattr(cfg.fisher, kind)
            opts = {
                "checkpoint": str(out / "checkpoints" / task),
                "task": task,
                "kind": ARTIFACT_KINDS[kind],
                "data_dir": cfg.data_dir,
                "num_examples": a.num_examples,
                "seed": a.seed,
                "batch_size": a.batch_size,
            }
            if kind != "grams":
                opts.update(aggregation=a.aggregation, labels=a.labels)
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
            deps += [f"fisher/{t}/{k}" for t in combo for k in ARTIFACT_KINDS if k in needs and k in kinds]
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


# ---------------------------------------------------------------------------------------------- running

# Variables by which a launcher (torchrun, srun, Lightning's own) tells a process its rank; a stage that
# runs on rank 0 alone under such a launcher gets an environment without them.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_JOB_NAME",
)


def is_global_zero() -> bool:
    """True unless a launcher (torchrun, srun, Lightning's own) says this process is another rank."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def global_rank() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"


def external_world() -> int:
    """Processes started by an external launcher (torchrun's WORLD_SIZE, srun's SLURM_NTASKS), else 1."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and os.environ.get("SLURM_STEP_ID") is not None:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


def on_every_rank(stage: Stage) -> bool:
    """True for a stage that needs a launcher (DDP, several devices or nodes): every rank runs it."""
    return stage.launch is not None and not stage.launch.in_process()


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (Python and C level) to `log` while the block runs."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "a", buffering=1) as f:
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return ""


class StageFailed(RuntimeError):
    """A stage failed or cannot run; the message names it (and its log)."""


def check_fresh_output(stage: Stage, started: float, log: Path) -> None:
    """Before a stage is stamped: its output was written by this run (not left from an earlier one) and, for an
    artifact, its own header names the kind, task and weights asked for and no more examples than asked."""
    from fmn_pl.artifacts import Artifact
    from fmn_pl.checkpoint import METADATA_FILE

    written = stage.output / METADATA_FILE if stage.output.is_dir() else stage.output
    if written.stat().st_mtime < int(started):  # whole seconds: file systems with coarse times
        raise StageFailed(f"stage {stage.id} ended without writing {written} (it is older than the stage); see {log}")
    if stage.kind != "fisher":
        return
    kind = stage.output.name.removesuffix(".safetensors")
    meta = Artifact(stage.output, kind, stage.options["checkpoint"]).metadata  # checks kind and weights
    asked = stage.options.get("num_examples")
    if meta.get("task") != stage.options["task"] or (asked is not None and int(meta.get("num_examples", 0)) > asked):
        raise StageFailed(
            f"stage {stage.id}: {stage.output} records task {meta.get('task')!r} and "
            f"{meta.get('num_examples')} examples, not what the stage asked for; see {log}"
        )


def write_files(stage: Stage) -> None:
    for name, text in stage.files.items():
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)


def resume_folder(stage: Stage, cfg: PipelineConfig, key: str) -> Path:
    """Where a fine-tuning stage stopped by SIGTERM leaves its resumable `last.ckpt`: one folder per stage key,
    so a rerun with the same options goes on from it and one with other options starts afresh."""
    return Path(cfg.output) / "resume" / f"{stage.id.split('/')[1]}-{key[:16]}"


def resume_argv(stage: Stage, cfg: PipelineConfig, key: str) -> list[str]:
    """The fine-tuning stage's `--export.resume_dir`, and `--ckpt_path` when a SIGTERM left a checkpoint there."""
    if stage.kind != "fit" or not key:
        return []
    folder = resume_folder(stage, cfg, key)
    last = folder / "last.ckpt"
    return [f"--export.resume_dir={folder}", *([f"--ckpt_path={last}"] if last.is_file() else [])]


def run_stage(
    stage: Stage, cfg: PipelineConfig, log: Path, alone: bool = False, port_offset: int = 0, key: str = ""
) -> None:
    """Run one stage: in this process when it needs no launcher, else as `python -m fmn_pl.cli <stage>`.

    `alone`: a single-process stage under an external launcher; it runs in a child process that does not see
    the launcher's rank variables (so Lightning does not wait for ranks that will never join). `port_offset`:
    the stage's number, which every rank knows, for a port of its own under torchrun."""
    write_files(stage)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(stage.command())}\n")
    if stage.kind == "report":
        with output_to(log):
            write_report(cfg)
        return
    argv = [*stage.argv, *(stage.launch.argv() if stage.launch else []), *resume_argv(stage, cfg, key)]
    if "--ckpt_path" in " ".join(argv):
        print(f"resuming from {argv[-1].partition('=')[2]} (left by SIGTERM)", file=sys.stderr)
    if not alone and not on_every_rank(stage):
        from fmn_pl.cli import EXIT_SIGNAL, is_user_error, one_line, run_stage_command

        saved_argv = sys.argv
        sys.argv = ["fmn-pl", stage.kind, *argv]  # what the stage would see when run alone
        with output_to(log):
            try:
                run_stage_command([stage.kind, *argv])
            except SystemExit as e:
                if e.code in EXIT_SIGNAL:
                    raise  # interrupted: the pipeline stops too, with the same status
                if e.code not in (0, None):
                    raise StageFailed(f"exit status {e.code}") from e
            except BaseException as e:  # in the log as the shell would show it
                if isinstance(e, Exception) and is_user_error(e):
                    print(f"fmn-pl {stage.kind}: error: {one_line(e)}", file=sys.stderr)
                else:
                    traceback.print_exc()
                raise
            finally:
                sys.argv = saved_argv
        return
    # Its own process: Lightning's launcher starts the other ranks from this command line, or, under
    # srun/torchrun, this process is one rank (it inherits the launcher's environment).
    env = dict(os.environ)
    if alone:
        for var in LAUNCHER_VARS:
            env.pop(var, None)
    elif env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's workers share its agent's store, where one stage's process group would find the previous
        # stage's (dead) addresses: each stage gets its own store, hosted by its rank 0 on a port of its own.
        env["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        env["MASTER_PORT"] = str(int(env.get("MASTER_PORT", "29500")) + 1 + port_offset)
    cmd = [sys.executable, "-m", "fmn_pl.cli", stage.kind, *argv]
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc in (143, 130, -15, -2):  # the stage's process was stopped by a signal: so is the pipeline
        raise SystemExit(143 if rc in (143, -15) else 130)
    if rc != 0:
        raise StageFailed(f"exit status {rc}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system, all threads; a rank that Lightning
    launched counts too): with the load average, it tells a stage's cost on shared cores from its wall time."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _matches(stage_id: str, patterns: Optional[Sequence[str]]) -> bool:
    return patterns is None or any(
        fnmatch.fnmatchcase(stage_id, p) or stage_id.startswith(p.rstrip("/") + "/") for p in patterns
    )


def wait_for_rank_zero(stage: Stage, cfg: PipelineConfig, key: str, since: float, poll_s: float = 2.0) -> str:
    """On another rank: wait until rank 0 stamps `stage` with `key` (newer than `since`); its output identity."""
    stamp_file = stamp_path(cfg, stage)
    failed = stamp_file.with_suffix(".failed")
    while True:
        stamp = read_stamp(stamp_file)
        if stamp is not None and stamp.get("key") == key and stamp.get("finished_unix", 0) >= since:
            return stamp["output"]
        if failed.is_file() and failed.stat().st_mtime >= since:
            raise StageFailed(f"{stage.id} failed on rank 0: {failed.read_text().strip()}")
        time.sleep(poll_s)


def execute(
    cfg: PipelineConfig,
    only: Optional[Sequence[str]] = None,
    rerun: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> dict[str, str]:
    """Run the stages that are not up to date; return {stage id: "ran" | "skipped" | "rank 0"}.

    Under an external launcher (srun, torchrun: one pipeline per rank) every rank runs the stages that need
    a launcher; the others run on rank 0 alone, and another rank that needs one's output waits for its stamp.
    """
    started = time.time()
    stages = plan(cfg)
    out = Path(cfg.output)
    zero, multi = is_global_zero(), external_world() > 1
    ids = Identities()
    done: dict[str, str] = {}  # stage id -> identity of its output, for stages known finished in this run
    status: dict[str, str] = {}
    selected = {s.id for s in stages if _matches(s.id, only)}
    if only is not None and not selected:
        raise ValueError(f"--only {list(only)} matches no stage; stages are: {', '.join(s.id for s in stages)}")
    needed = set(selected)
    for s in reversed(stages):  # what the selected stages read must be known finished
        if s.id in needed:
            needed.update(s.deps)
    awaited: set[str] = set()  # another rank: rank-0 stages whose outputs a stage of this rank reads
    if multi and not zero:
        for s in reversed(stages):
            if s.id in needed and (on_every_rank(s) or s.id in awaited):
                awaited.update(s.deps)
    width = len(str(len(stages)))
    for n, stage in enumerate(stages, 1):
        if stage.id not in needed:
            continue
        missing = [d for d in stage.deps if d not in done]
        if missing and multi and not zero and all(status.get(d) == "rank 0" for d in missing):
            status[stage.id] = "rank 0"  # reads rank-0 outputs this rank never waited for: rank 0's too
            continue
        forced = bool(rerun) and _matches(stage.id, rerun)
        key, current, why = freshness(stage, cfg, ids, done, forced)
        prefix = f"[{n:>{width}}/{len(stages)}] {stage.id}"
        if why is None:
            done[stage.id] = current  # type: ignore[assignment]
            status[stage.id] = "skipped"
            if zero and stage.id in selected:
                wall = (read_stamp(stamp_path(cfg, stage)) or {}).get("wall_s", 0)
                echo(f"{prefix}: up to date ({wall:.1f} s when run)")
            continue
        if stage.id not in selected:
            why = f"its inputs {missing} are not finished" if missing else "it is not finished or is out of date"
            raise StageFailed(f"{stage.id} is needed by the selected stages but {why}: run it first")
        if missing:
            raise StageFailed(f"{stage.id} cannot run: {missing} did not finish")
        assert key is not None
        stamp_file = stamp_path(cfg, stage)
        if multi and not zero and not on_every_rank(stage):
            status[stage.id] = "rank 0"
            if stage.id in awaited:
                done[stage.id] = wait_for_rank_zero(stage, cfg, key, started if forced else 0.0)
            continue
        if zero:
            stamp_file.unlink(missing_ok=True)  # from now on nothing says this stage is finished
            stamp_file.with_suffix(".failed").unlink(missing_ok=True)
        log = out / "logs" / (stage.id.replace("/", "__") + ("" if zero else f".rank{global_rank()}") + ".log")
        if zero:
            echo(f"{prefix}: running, {why} (log: {log})")
        start, cpu, started_wall = time.perf_counter(), cpu_seconds(), time.time()
        own_peak = reset_peak() and not on_every_rank(stage) and not multi  # in this process: its peak is the stage's
        try:
            run_stage(stage, cfg, log, alone=multi and not on_every_rank(stage), port_offset=n, key=key)
        except BaseException as e:
            if zero:
                echo(f"{prefix}: FAILED ({e}); last lines of {log}:\n{tail(log)}")
                stamp_file.parent.mkdir(parents=True, exist_ok=True)
                stamp_file.with_suffix(".failed").write_text(f"{type(e).__name__}: {e}; see {log}\n")
            if isinstance(e, Exception):
                raise StageFailed(f"stage {stage.id} failed; see {log}") from e
            raise
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        status[stage.id] = "ran"
        if not zero:  # rank 0 checks and stamps the output (it may write it after this rank is done)
            done[stage.id] = wait_for_rank_zero(stage, cfg, key, started)
            continue
        ids.forget(stage)
        current = ids.output(stage)
        if current is None:
            raise StageFailed(f"stage {stage.id} finished but its output {stage.output} is missing; see {log}")
        check_fresh_output(stage, started_wall, log)
        done[stage.id] = current
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            stamp_file,
            {
                "stage": stage.id,
                "key": key,
                "output": current,
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 3),
                "peak_rss_mb": round(peak_rss_mb(), 1) if own_peak else None,
                "load": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),  # how shared the machine was
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "finished_unix": time.time(),
                "command": stage.command(),
                "launch": asdict(stage.launch) if stage.launch else None,
                "options": stage.options,
            },
        )
        if stage.kind == "fit":  # finished: no checkpoint of an interrupted attempt is needed any more
            for folder in resume_folder(stage, cfg, key).parent.glob(f"{stage.id.split('/')[1]}-*"):
                shutil.rmtree(folder, ignore_errors=True)
        echo(f"{prefix}: done in {wall:.1f} s")
    return status


# ---------------------------------------------------------------------------------------------- report


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
            "fisher": {k: {"num_examples": getattr(cfg.fisher, k).num_examples} for k in kinds},  # None: default
            "eval": {"max_eval_samples": cfg.merge.max_eval_samples},
        },
    }


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def gather(cfg: PipelineConfig, partial: bool = False) -> dict[str, Any]:
    """The combined report as data: per-task scores of every merge, means per combination, stage costs.
    `partial`: leave out merges not run yet (a look at a run in progress) instead of failing on them."""
    from fmn_pl.artifacts import Artifact, artifact_path
    from fmn_pl.checkpoint import read_metadata
    from fmn_pl.report import rows

    stages = plan(cfg)
    opts = report_options(cfg)
    labels = list(dict.fromkeys(["average", *(c["label"] for c in opts["columns"])]))
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    flags: list[str] = []
    for s in (s for s in stages if s.kind == "merge"):
        if partial and not s.output.is_file():
            continue
        rep = json.loads(s.output.read_text())
        combo = "+".join(s.options["tasks"])
        for r in rows(rep):  # constant, individual and average are in every report of a combination: kept once
            base = {"combination": combo, "task": r["task"], "metrics": r["metrics"]}
            for column, which, norm in (
                ("constant", "baseline", None),
                ("individual", "individual", 1.0),
                ("average", "average", r["normalized_average"]),
                (s.options["label"], "merged", r["normalized"]),
            ):
                results.setdefault(
                    (combo, r["task"], column),
                    {**base, "column": column, "score": r[which], "normalized": norm, "mse": r["mse"][which]},
                )
            flags += [
                f"{combo} {s.options['label']}: {r['task']}: {f}"
                for f in r["flags"]
                if not f.startswith(("individual", "average"))
            ]
            flags += [f"{combo}: {r['task']}: {f}" for f in r["flags"] if f.startswith(("individual", "average"))]
        flags += [f"{combo} {s.options['label']}: {remark}" for remark in rep.get("remarks", [])]
    table = list(results.values())
    summary = {
        combo: {
            col: {
                k: _mean([r[k] for r in table if r["combination"] == combo and r["column"] == col])
                for k in ("score", "normalized")
            }
            for col in ["constant", "individual", *labels]
        }
        for combo in opts["combinations"]
    }
    overall = {
        col: {k: _mean([summary[c][col][k] for c in summary]) for k in ("score", "normalized")}
        for col in ["constant", "individual", *labels]
    }
    costs = []
    for s in stages:
        if s.kind != "report":
            stamp = read_stamp(stamp_path(cfg, s)) or {}
            costs.append(
                {
                    "stage": s.id,
                    "kind": s.kind,
                    "wall_s": stamp.get("wall_s"),
                    "cpu_s": stamp.get("cpu_s"),
                    "peak_rss_mb": stamp.get("peak_rss_mb"),
                    "load": stamp.get("load"),
                    "cpus": stamp.get("cpus"),
                    "finished": stamp.get("finished"),
                    "launch": stamp.get("launch"),
                }
            )
    checkpoints = {}
    for t in cfg.tasks:
        folder = Path(cfg.output) / "checkpoints" / t
        meta = read_metadata(folder)
        checkpoints[t] = {
            k: meta.get(k) for k in ("num_train_examples", "epoch", "epochs_trained", "metrics", "fingerprint")
        }
        checkpoints[t]["artifacts"] = {  # what each artifact was computed from, as it records it
            k: {
                m: Artifact(artifact_path(folder, k), k).metadata.get(m)
                for m in ("num_examples", "aggregation", "labels", "batch_size", "seconds")
            }
            for k in artifact_kinds(cfg)
        }
    return {
        **opts,
        "labels": labels,
        "checkpoints": checkpoints,
        "results": table,
        "summary": summary,
        "flags": list(dict.fromkeys(flags)),
        "overall": overall,
        "stages": costs,
        "cost_s": {
            k: round(sum(c["wall_s"] or 0 for c in costs if c["kind"] == k), 1) for k in ("fit", "fisher", "merge")
        },
        "cpu_s": {
            k: round(sum(c["cpu_s"] or 0 for c in costs if c["kind"] == k), 1) for k in ("fit", "fisher", "merge")
        },
    }


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def caps_text(data: dict[str, Any]) -> str:
    """One paragraph saying how much data each stage read (the caps of a quick run)."""
    caps = data["caps"]
    fit = "; ".join(
        f"{t} {c.get('num_train_examples') or '?'} training examples"
        + (f" (capped at {caps['fit'][t]['max_train_samples']})" if caps["fit"][t]["max_train_samples"] else " (all)")
        + f", {caps['fit'][t]['max_epochs']} epoch(s)"
        for t, c in data["checkpoints"].items()
    )

    def examples(kind: str) -> str:
        counts = sorted({str(c["artifacts"][kind]["num_examples"]) for c in data["checkpoints"].values()})
        return "/".join(counts)

    fisher = ", ".join(f"{k} on {examples(k)} training examples per task" for k in caps["fisher"])
    cap = caps["eval"]["max_eval_samples"]
    scored = (
        "all validation examples" if cap is None else f"at most {cap} validation examples per task (a seeded sample)"
    )
    return f"Fine-tuning: {fit}. Artifacts: {fisher or 'none'}. Scored on {scored}."


def report_markdown(data: dict[str, Any]) -> str:
    """The combined report as Markdown: normalized means per combination, per-task scores, stage costs."""
    labels = data["labels"]
    lines = [
        "# fmn-pl pipeline report",
        "",
        f"Model `{data['model']}`, data `{data['data_dir']}`, tasks {', '.join(data['tasks'])}; "
        f"{len(data['combinations'])} task combination(s) merged with each method.",
        "",
        caps_text(data),
        "",
        "## Normalized score (merged / individual, %, mean over the merged tasks)",
        "",
        "| tasks | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for combo, cols in data["summary"].items():
        lines.append(f"| {combo} | " + " | ".join(_pct(cols[c]["normalized"]) for c in labels) + " |")
    if len(data["summary"]) > 1:
        lines.append(
            "| **mean** | " + " | ".join(f"**{_pct(data['overall'][c]['normalized'])}**" for c in labels) + " |"
        )
    cols = ["constant", "individual", *labels]
    index = {(r["combination"], r["task"], r["column"]): r for r in data["results"]}
    lines += [
        "",
        "## Scores per task (x100)",
        "",
        "Constant: the best constant prediction on the same examples (majority class, or the label mean), "
        "what a model that learned nothing scores.",
        "",
        "| tasks | task | metrics | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---:|" * len(cols),
    ]
    for combo in data["summary"]:
        for t in dict.fromkeys(r["task"] for r in data["results"] if r["combination"] == combo):
            metrics = ", ".join(index[(combo, t, "individual")]["metrics"])
            lines.append(
                f"| {combo} | {t} | {metrics} | "
                + " | ".join(_pct((index.get((combo, t, c)) or {}).get("score")) for c in cols)
                + " |"
            )
    mse = [r for r in data["results"] if r.get("mse") is not None]
    if mse:
        lines += [
            "",
            "## Mean squared error of the regression tasks (correlations ignore scale)",
            "",
            "| tasks | task | " + " | ".join(cols) + " |",
            "|---|---|" + "---:|" * len(cols),
        ]
        for combo, t in dict.fromkeys((r["combination"], r["task"]) for r in mse):
            lines.append(
                f"| {combo} | {t} | "
                + " | ".join(
                    "–" if (index.get((combo, t, c)) or {}).get("mse") is None else f"{index[(combo, t, c)]['mse']:.3f}"
                    for c in cols
                )
                + " |"
            )
    if data.get("flags"):
        lines += ["", "## Flags", "", *[f"- {f}" for f in data["flags"]]]
    loads = any(c.get("load") is not None for c in data["stages"])
    lines += [
        "",
        "## Cost per stage",
        "",
        "Wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in data["cost_s"].items())
        + "; CPU time (all threads): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in data["cpu_s"].items())
        + ". On shared cores wall time grows, and CPU time too (threads waiting for a core spin)"
        + ("; load: the 1-minute load average when the stage ended / the machine's cores." if loads else "."),
        "",
        "| stage | wall s | CPU s | peak memory MB |" + (" load |" if loads else "") + " where |",
        "|---|---:|---:|---:|" + ("---:|" if loads else "") + "---|",
    ]
    for c in data["stages"]:
        launch = c.get("launch")
        where = (
            (
                f"{launch['devices']} device(s) x {launch['num_nodes']} node(s), {launch['accelerator']}, "
                f"{launch['strategy']}"
            )
            if launch
            else "one process"
        )
        wall, cpu, load, peak = (
            "–" if c.get(k) is None else f"{c[k]:.1f}" for k in ("wall_s", "cpu_s", "load", "peak_rss_mb")
        )
        load = f" {load} / {c.get('cpus') or '?'} |" if loads else ""
        lines.append(f"| {c['stage']} | {wall} | {cpu} | {peak} |{load} {where} |")
    lines += [
        "",
        "Plots: `plots/normalized.png`, `plots/scores-<tasks>.png`, `plots/cost.png`. Each merge's own "
        "report: `merges/<tasks>/<label>/report.md`.",
    ]
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def _bars(ax: Any, groups: list[str], series: dict[str, list[Optional[float]]], ylabel: str) -> None:
    """Grouped bars (values x100), one colour per series, legend below."""
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [0 if v is None else 100 * v for v in values], width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend(
        fontsize="small", ncols=min(4, len(series)), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False
    )


def report_plots(data: dict[str, Any], folder: Path) -> list[Path]:
    """plots/normalized.png (methods per combination), plots/scores-<tasks>.png, plots/cost.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, paths = data["labels"], []
    combos = list(data["summary"])
    many = len(combos) > 1
    groups = combos + (["mean"] if many else [])
    series = {
        c: [data["summary"][g][c]["normalized"] for g in combos] + ([data["overall"][c]["normalized"]] if many else [])
        for c in labels
    }
    fig, ax = plt.subplots(figsize=(2.5 + 0.35 * len(groups) * len(labels), 3.8))
    _bars(ax, groups, series, "merged / individual (%)")
    ax.axhline(100, color="black", linewidth=0.6, linestyle="--")
    low = min([100 * v for vals in series.values() for v in vals if v is not None] or [0.0])
    ax.set_ylim(max(0.0, low - 10), None)
    ax.set_title("Normalized score per merge (mean over its tasks)")
    paths.append(_save(fig, folder / "normalized.png"))
    index = {(r["combination"], r["task"], r["column"]): r["score"] for r in data["results"]}
    cols = ["constant", "individual", *labels]
    for combo in combos:
        tasks = list(dict.fromkeys(r["task"] for r in data["results"] if r["combination"] == combo))
        fig, ax = plt.subplots(figsize=(2.5 + 0.3 * len(tasks) * len(cols), 3.6))
        _bars(ax, tasks, {c: [index.get((combo, t, c)) for t in tasks] for c in cols}, "score (x100)")
        ax.set_title(f"Scores per task: {combo}")
        paths.append(_save(fig, folder / f"scores-{combo}.png"))
    costs = [c for c in data["stages"] if c["wall_s"] is not None][::-1]
    if costs:
        colors = {"fit": "tab:blue", "fisher": "tab:orange", "merge": "tab:green"}
        fig, ax = plt.subplots(figsize=(7, 1.4 + 0.26 * len(costs)))
        ys = range(len(costs))
        ax.barh(
            [y + 0.2 for y in ys],
            [c["wall_s"] for c in costs],
            0.4,
            label="wall",
            color=[colors.get(c["kind"], "tab:gray") for c in costs],
        )
        ax.barh(
            [y - 0.2 for y in ys],
            [c["cpu_s"] or 0 for c in costs],
            0.4,
            label="CPU (hatched)",
            hatch="///",
            color="white",
            edgecolor=[colors.get(c["kind"], "tab:gray") for c in costs],
        )
        ax.set_yticks(list(ys), [c["stage"] for c in costs], fontsize=7)
        ax.set_xlabel("seconds")
        ax.legend(fontsize="small", loc="lower right")
        ax.set_title(
            "Cost per stage, wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in data["cost_s"].items()), fontsize="medium"
        )
        paths.append(_save(fig, folder / "cost.png"))
    return paths


def write_report(cfg: PipelineConfig) -> Path:
    """Combine the merges' reports into <output>/report.{json,md} and <output>/plots/*.png."""
    out = Path(cfg.output)
    data = gather(cfg)
    report_plots(data, out / "plots")
    text = report_markdown(data)
    md = out / "report.md"
    tmp = md.with_name(f".{md.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(md)
    write_json(out / "report.json", data)  # last: the stage's output, so its presence means the report is whole
    print(text)
    return out / "report.json"


# ---------------------------------------------------------------------------------------------- dry run


def check_source(what: str, source: str, paths: Callable[[Path], list[Path]]) -> tuple[list[str], list[str]]:
    """(problems, notes) about a model or data source: a local folder must hold `paths`; a hub name is noted."""
    from fmn_pl.options import is_local_path

    if not is_local_path(source):
        return [], [f"{what} {source!r} is a hub name: downloaded on first use (not checked here)"]
    root = Path(source).expanduser()
    if not root.is_dir():
        return [f"{what}: folder {root} does not exist"], []
    try:
        missing = [str(p) for p in paths(root) if not p.is_file()]
    except FileNotFoundError as e:
        return [f"{what}: {e}"], []
    return [f"{what}: {m} does not exist" for m in missing], []


def check_args(stage: Stage) -> Optional[str]:
    """Parse the stage's command line with the stage's own parser (nothing instantiated): the error, or None."""
    import io

    if stage.kind == "report":
        return None
    argv = [*stage.argv, *(stage.launch.argv() if stage.launch else [])]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if stage.kind == "fit":
                from fmn_pl.data import GLUEDataModule
                from fmn_pl.fit import FmnCLI
                from fmn_pl.module import GLUETransformer

                class Parse(FmnCLI):  # parse only: no seed set, no model loaded
                    def _set_seed(self) -> None:
                        pass

                    def instantiate_classes(self) -> None:
                        pass

                conf = next(iter(stage.files.values()))  # the generated config, not yet written
                Parse(
                    GLUETransformer,
                    GLUEDataModule,
                    args=["--config", conf, *argv[2:]],
                    run=False,
                    seed_everything_default=False,
                )
            elif stage.kind == "merge":
                from fmn_pl.merge import build_parser, normalize_argv

                build_parser().parse_args(normalize_argv(argv))
            else:
                import importlib

                module = importlib.import_module(f"fmn_pl.{stage.kind}")
                parse = getattr(module, "normalize_argv", list)
                module.build_parser().parse_args(parse(argv))
    except SystemExit as e:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {e.code}"
    except Exception as e:  # noqa: BLE001 - any failure to parse is one line of the dry run
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"
    return None


def dry_run(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> list[str]:
    """Check every stage's inputs and arguments without computing; print the plan; return the problems."""
    from fmn_pl.data import split_file
    from fmn_pl.tasks import get_task

    stages = plan(cfg)
    problems, notes = check_source("model", cfg.model, lambda root: [root / "config.json"])
    for t in cfg.tasks:
        spec = get_task(t)
        p, n = check_source(
            f"data of {t}", cfg.data_dir, lambda root: [split_file(root, spec, s) for s in ("train", *spec.eval_splits)]
        )
        problems += p
        notes += n if t == cfg.tasks[0] else []
    ids, done = Identities(), {}
    width = len(str(len(stages)))
    counts: dict[str, int] = {}
    for n, stage in enumerate(stages, 1):
        error = check_args(stage)
        if error:
            problems.append(f"{stage.id}: its arguments do not parse: {error}")
        try:
            _, current, why = freshness(stage, cfg, ids, done)
        except (FileNotFoundError, ValueError) as e:  # an absent input, reported above
            current, why = None, f"inputs not readable: {e}"
        if why is None:
            done[stage.id] = current  # type: ignore[assignment]
        state = "up to date" if why is None else "would run"
        counts[state] = counts.get(state, 0) + 1
        echo(f"[{n:>{width}}/{len(stages)}] {stage.id}: {state}{'' if why is None else f' ({why})'}")
        if why is not None and stage.kind != "report":
            echo(f"    $ {' '.join(stage.command())}")
    for note in notes:
        echo(f"note: {note}")
    for problem in problems:
        echo(f"problem: {problem}")
    echo(
        f"dry run: {len(stages)} stages ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
        f"{len(problems)} problem(s); nothing was computed or written"
    )
    return problems


# ---------------------------------------------------------------------------------------------- entry


def config_yaml(cfg: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(asdict(cfg), sort_keys=False)


def main(argv: Sequence[str] | None = None) -> dict[str, str] | list[str]:
    """`fmn-pl pipeline --config configs/pipeline/demo.yaml [--dry_run true] [--only ...] [--rerun ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, flags = parse_config(argv)
    out = Path(cfg.output)
    if flags["dry_run"]:
        problems = dry_run(cfg)
        if problems:
            raise SystemExit(1)
        return problems
    if is_global_zero():
        from fmn_pl.checkpoint import check_writable

        check_writable(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "pipeline.yaml"  # the resolved config that produced this folder
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(config_yaml(cfg))
        tmp.replace(path)
    start = time.perf_counter()
    try:
        status = execute(cfg, flags["only"], flags["rerun"])
    except StageFailed as e:  # the stage's log tail is printed already: one line, no traceback
        print(f"fmn-pl pipeline: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if is_global_zero():
        ran = sum(v == "ran" for v in status.values())
        report = f"; report: {out / 'report.md'}" if (out / "report.md").is_file() else ""
        print(
            f"pipeline: {ran} stage(s) ran, {sum(v == 'skipped' for v in status.values())} up to date, "
            f"{time.perf_counter() - start:.1f} s{report}"
        )
    return status
