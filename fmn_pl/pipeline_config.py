"""The pipeline's config: its dataclasses (what `configs/pipeline/*.yaml` holds), the parser, and the
checks and per-task resolution of the options, before any stage is planned."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Optional, Sequence, Union

from fmn_pl.fit_config import DataOptions, ModelOptions
from fmn_pl.kinds import KINDS, kind_sections, options_class
from fmn_pl.options import EvalOptions, SelectionOptions

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
    """Fine-tuning of one model per task: the recipe each task's `FitConfig` is built from (`stages.fit_config`;
    `configs/fit/*.yaml` for the stage alone), with the defaults of its sections where they are the same option."""

    learning_rate: float = ModelOptions.learning_rate
    """Peak AdamW learning rate (linear warm-up, then linear decay)."""
    weight_decay: float = ModelOptions.weight_decay
    """AdamW weight decay (not on biases and LayerNorm weights)."""
    warmup_ratio: float = ModelOptions.warmup_ratio
    """Fraction of the training steps spent warming the learning rate up."""
    max_epochs: int = 3
    """Training epochs; the epoch with the best score on the held-out rows is exported (the last one when
    `holdout_samples` is 0): validation rows never pick it."""
    batch_size: int = DataOptions.batch_size
    """Training batch size (per device)."""
    max_length: Optional[int] = None
    """Truncation length (default: the task's, 64 for single sentences, 128 for pairs)."""
    max_train_samples: Optional[int] = None
    """Cap on training examples (a seeded sample without replacement); None: the whole split."""
    max_eval_samples: Optional[int] = None
    """Cap on the held-out rows scored after each epoch (to pick the exported epoch); None: all of them."""
    holdout_samples: int = 0
    """Training rows held out (never trained on): they pick the exported epoch, and merge methods that choose
    options choose them on these rows. The same rows for every seed."""
    seed: int = 42
    """`seed_everything` seed of the fine-tuning run (also the data sampling seed); `seeds` overrides it."""
    precision: str = "32-true"
    """Lightning precision ("32-true", "bf16-mixed", "16-mixed", ...)."""
    accumulate_grad_batches: Optional[int] = None
    """Lightning's gradient accumulation (None: 1, every batch a step)."""
    gradient_clip_val: Optional[float] = None
    """Lightning's gradient clipping by norm (None: none)."""
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-task overrides of the options above, e.g. {rte: {learning_rate: 3.0e-5, max_epochs: 10}}."""
    launch: Optional[Launch] = None
    """Where this stage runs (default: the pipeline's `trainer`)."""


@dataclass
class ArtifactOptions:
    """How one artifact kind is computed (`fmn-pl fisher --kind ...`): these options, and the kind's own (its
    `fmn_pl.kinds.KindOption`s, e.g. aggregation and labels for the Fisher kinds) in its `fisher.<kind>` section."""

    num_examples: Optional[int] = None
    """Training examples it reads (a seeded sample without replacement; None: the stage's default)."""
    batch_size: Optional[int] = None
    """Batch size (None: the stage's default)."""
    seed: int = 0
    """Seed of the example sample (and of sampled labels)."""


@kind_sections(ArtifactOptions)
@dataclass
class FisherOptions:
    """Artifacts beside each task checkpoint: mask-node Fisher, full diagonal Fisher, Gram matrices. Besides the
    fields below, one section per kind in `fmn_pl.kinds.KINDS`, named by it: `fisher.mask_fisher.aggregation`."""

    kinds: Optional[list[str]] = None
    """Artifacts to compute (mask_fisher, full_fisher, grams, or a kind registered in `fmn_pl.kinds.KINDS`);
    None: exactly those the merge methods need."""
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
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    """Where and how the methods choose their options: the same rows and rules for every method."""
    eval: EvalOptions = field(default_factory=EvalOptions)
    """The final scoring of every merge (e.g. {max_samples: 400}: a seeded sample, the same for every method)."""
    batch_size: int = 64
    """Batch size of selection and evaluation scoring."""
    own_tensors: Optional[list[str]] = None
    """Glob patterns of body tensors each task keeps its own of (e.g. ["*.pooler.*"]); None: every tensor merged."""
    save_model: bool = True
    """Keep each merged body on disk (turn off to save space on large sweeps)."""
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
    seeds: Optional[list[int]] = None
    """Fine-tuning seeds, an axis of the study: each seed is a whole run (fit with `fit.seed` = it, artifacts,
    merges, report) in <output>/seed-<seed>/, and the reports across seeds give intervals. None: one run in
    <output> with `fit.seed`."""
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
        "--wait",
        type=bool,
        default=False,
        help="wait for another pipeline writing the same output (it holds <output>/.fmn-pl.lock) to finish, "
        "instead of refusing at once",
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
    """(config, {dry_run, wait, only, rerun}) from command-line arguments."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    flags = {k: ns.pop(k) for k in ("dry_run", "wait", "only", "rerun")}
    for k in ("only", "rerun"):  # a list, or one string of comma-separated patterns
        if isinstance(flags[k], str):
            flags[k] = [p.strip() for p in flags[k].split(",") if p.strip()]
    ns.pop("config", None)
    init = parser.instantiate_classes(ns) if hasattr(parser, "instantiate_classes") else parser.instantiate(ns)
    cfg = PipelineConfig(**{f.name: init[f.name] for f in fields(PipelineConfig)})
    return normalize(cfg), flags


COUNTS = ("max_epochs", "batch_size", "max_length", "max_train_samples", "max_eval_samples", "accumulate_grad_batches")


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
    for kind in KINDS:
        a = artifact_options(cfg, kind)
        check_count(f"fisher.{kind}.num_examples", a.num_examples)
        check_count(f"fisher.{kind}.batch_size", a.batch_size)
    check_count("merge.batch_size", cfg.merge.batch_size)
    cfg.merge.selection.check("merge.selection")
    cfg.merge.eval.check("merge.eval")


def normalize(cfg: PipelineConfig) -> PipelineConfig:
    """Canonical task names, checked options and per-task overrides; errors name the bad value."""
    from fmn_pl.tasks import get_task

    tasks = [get_task(t).name for t in cfg.tasks]
    check_counts(cfg)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks lists a task twice: {cfg.tasks}")
    known = {f.name for f in fields(FitOptions)} - {"per_task", "launch"}
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
        build_method(m)  # an unknown method or a bad option fails here, before any stage runs
    return replace(cfg, tasks=tasks, fit=replace(cfg.fit, per_task=per_task))


def seed_runs(cfg: PipelineConfig) -> list[PipelineConfig]:
    """The runs of the config: one per seed of `seeds` (in <output>/seed-<seed>/), or itself alone."""
    if cfg.seeds is None:
        return [cfg]
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds must list distinct seeds (or be null for one run), got {cfg.seeds}")
    if any("seed" in over for over in cfg.fit.per_task.values()):
        raise ValueError("fit.per_task sets a seed, which `seeds` decides: remove one of them")
    return [
        replace(cfg, seeds=None, output=f"{cfg.output.rstrip('/')}/seed-{s}", fit=replace(cfg.fit, seed=s))
        for s in cfg.seeds
    ]


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


def artifact_options(cfg: PipelineConfig, kind: str) -> ArtifactOptions:
    """The configured options of one artifact kind (`fisher.<kind>`): num_examples, batch_size, seed and the kind's
    own options; their defaults for a kind without a section (one registered after this module was imported)."""
    options: Optional[ArtifactOptions] = getattr(cfg.fisher, kind, None)
    return options or options_class(ArtifactOptions, KINDS[kind].options)()


def artifact_kinds(cfg: PipelineConfig) -> list[str]:
    """The artifact kinds to compute: as configured, or those the merge methods need."""
    needed: list[str] = []
    for spec in cfg.merge.methods:
        needed += [k for k in KINDS if k in build_method(spec).needs]
    if cfg.fisher.kinds is None:
        return list(dict.fromkeys(needed))
    unknown = [k for k in cfg.fisher.kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"fisher.kinds: unknown artifact kind(s) {unknown}; expected some of {list(KINDS)}")
    missing = [k for k in needed if k not in cfg.fisher.kinds]
    if missing:
        raise ValueError(
            f"fisher.kinds {cfg.fisher.kinds} lacks {sorted(set(missing))}, which merge.methods need "
            "(leave fisher.kinds null to compute exactly what they need)"
        )
    return list(dict.fromkeys(cfg.fisher.kinds))


def build_method(spec: MethodSpec) -> Any:
    """The method instance of a `merge.methods` entry; an unknown name fails with the known names, bad options with
    the entry's column. An instance, not its class: options can change what it needs (FMN's `scaling: null` needs
    the base model), and its `options()` fill in the defaults the stage's key hashes."""
    from fmn_pl.merging import method_class

    cls = method_class(spec.name)
    try:
        return cls(**spec.options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"merge.methods: {spec.column}: {e}") from None


def fit_options(cfg: PipelineConfig, task: str) -> dict[str, Any]:
    """The fit options of one task: the shared ones with its per-task overrides applied."""
    base = {f.name: getattr(cfg.fit, f.name) for f in fields(FitOptions) if f.name not in ("per_task", "launch")}
    return {**base, **cfg.fit.per_task.get(task, {})}


# ---------------------------------------------------------------------------------------------- entry


def config_yaml(cfg: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(asdict(cfg), sort_keys=False)
