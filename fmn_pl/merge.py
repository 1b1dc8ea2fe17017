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
    report.json, report.md, report.png           merged vs individual vs plain average, per task
    config.yaml                                  the resolved configuration of this run
    <method>/                                    files a method keeps, if any (AdaMerging's logs, TALL's masks)

Inputs are checked before any work: at least two checkpoints of distinct tasks, one architecture,
vocabulary and tokenizer, the artifacts the method needs (present, of the right kind, computed on these
weights), and the base model when the method needs one.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from fmn_pl.artifacts import FILES, Artifact, artifact_path, load_artifact
from fmn_pl.checkpoint import FORMAT_VERSION, METADATA_FILE, atomic_dir, read_metadata, weights_fingerprint, write_json
from fmn_pl.merging import METHODS, MergeContext, MergeMethod
from fmn_pl.merging.reader import DTYPES, FLOAT_DTYPES, FileReader
from fmn_pl.options import check_count, is_local_path
from fmn_pl.resources import peak_rss_mb, reset_peak, scoring_memory, set_mmap_threshold

BODY_FILE = "model.safetensors"
TASK_BODY_FILE = "model-body.safetensors"
TASK_HEAD_FILE = "model-head.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Config attributes that must agree (read through each config's attribute map, e.g. DistilBERT's `dim`).
ARCH_ATTRS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_dim",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
)
_ST_DTYPES = {v: k for k, v in DTYPES.items()}
_ST_SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# ---------------------------------------------------------------------------------------------- safetensors I/O


def read_header(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a model folder's model*.safetensors, read from the headers only."""
    reader = FileReader(folder)
    return {k: (reader.dtype(k), reader.shape(k)) for k in reader.keys()}


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor (any order): the header is laid out from the specs first,
    so the merged body never has to be in memory at once."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        self.path, self.specs = Path(path), specs
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets, pos = {}, 0
        for key, (dtype, shape) in specs.items():
            n = _ST_SIZES[dtype] * math.prod(shape)
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[key], pos = (pos, pos + n), pos + n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.start, self.size = 8 + len(raw), pos
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self.start + pos)
        self.written: set[str] = set()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.specs:
            raise ValueError(f"{self.path.name}: unexpected tensor {key!r}")
        dtype, shape = self.specs[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if _ST_DTYPES.get(tensor.dtype) != dtype:
            raise ValueError(f"{self.path.name}: tensor {key!r} has dtype {tensor.dtype}, expected {dtype}")
        self._file.seek(self.start + self.offsets[key][0])
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.written.add(key)

    def abort(self) -> None:
        """Close without the completeness check (the caller is failing anyway; its temp folder goes)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        missing = [k for k in self.specs if k not in self.written]
        if missing:
            raise ValueError(
                f"{self.path.name}: no tensor was produced for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
            )


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Checked inputs of a merge."""

    checkpoints: list[Path]
    metadata: list[dict[str, Any]]
    tasks: list[str]
    config: Any
    body_prefix: str
    keys: list[str]  # floating-point body tensors: merged
    fixed: list[str]  # other body tensors (integer buffers): copied from the first checkpoint
    heads: list[list[str]]  # per checkpoint: its head tensors
    specs: dict[str, tuple[str, tuple[int, ...]]]  # body tensors of the first checkpoint
    headers: list[dict[str, tuple[str, tuple[int, ...]]]]
    base: Path | None = None
    artifacts: dict[tuple[int, str], Artifact] | None = None
    own: list[str] | None = None  # body tensors each task keeps from its own checkpoint (they joined `heads`)

    def context(self, **kw: Any) -> MergeContext:
        """A merge context over these checkpoints (plain-read, base model when given, checked artifacts);
        `kw` sets the rest (evaluate, selection_inputs, accelerator, progress, log)."""
        return MergeContext(
            checkpoints=self.checkpoints,
            tasks=self.tasks,
            config=self.config,
            body_prefix=self.body_prefix,
            keys=list(self.keys),
            readers=[FileReader(p) for p in self.checkpoints],
            base_reader=FileReader(self.base, prefix=self.body_prefix) if self.base else None,
            _artifacts=dict(self.artifacts or {}),
            **kw,
        )


def body_prefix(config: Any) -> tuple[str, str]:
    """("bert.", "BertModel"): the parameter prefix of the base model inside the task model, and its class."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return f"{model.base_model_prefix}.", type(model.base_model).__name__


def tokenizer_signature(folder: str | Path) -> str:
    """Hash of a tokenizer's class, vocabulary and how it tokenizes a probe text (casing, accents, digits)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder} has no loadable tokenizer: {e}") from e
    probe = tok("Hello WORLD, naïve café 12345 don't!", "Second SEGMENT.")["input_ids"]
    blob = json.dumps([type(tok).__name__.removesuffix("Fast"), sorted(tok.get_vocab().items()), probe])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_model(name_or_path: str) -> Path:
    """A local folder as is; a hub name through the local Hugging Face cache (or a download when online)."""
    if is_local_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"base model {path} does not exist")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown repo, ...: one line that says which
        raise FileNotFoundError(
            f"base model {name_or_path!r} is neither a folder nor a reachable hub model: {e}"
        ) from e


def check_inputs(
    checkpoints: Sequence[str | Path], method: MergeMethod, base: str | None, own_tensors: Sequence[str] = ()
) -> Inputs:
    """Every check a merge needs before it starts, with a one-line error naming the culprit. Body tensors that
    match an `own_tensors` pattern are not merged: each task keeps its own, as part of its head."""
    from transformers import AutoConfig

    name = method_name(method)
    paths = [Path(c) for c in checkpoints]
    if len(paths) < 2:
        raise ValueError(f"merging needs at least two checkpoints, got {len(paths)}")
    metadata = [read_metadata(p) for p in paths]
    tasks = [m["task"] for m in metadata]
    for j, t in enumerate(tasks):
        if t in tasks[:j]:
            raise ValueError(
                f"{paths[tasks.index(t)]} and {paths[j]} are both task {t!r}: each task may appear once "
                "(its head, output folder and report row are keyed by task)"
            )
    configs = [AutoConfig.from_pretrained(p) for p in paths]
    for attr in ARCH_ATTRS:
        values = [getattr(c, attr, None) for c in configs]
        for p, v in zip(paths[1:], values[1:]):
            if v != values[0]:
                raise ValueError(
                    f"{p} has {attr}={v} but {paths[0]} has {attr}={values[0]}: "
                    "checkpoints of different architectures cannot be merged"
                )
    signatures = [tokenizer_signature(p) for p in paths]
    for p, s in zip(paths[1:], signatures[1:]):
        if s != signatures[0]:
            raise ValueError(
                f"the tokenizer of {p} differs from that of {paths[0]} (vocabulary or normalisation): "
                "merged checkpoints must share one tokenizer"
            )
    prefix, _ = body_prefix(configs[0])
    headers = [read_header(p) for p in paths]
    body = [{k: v for k, v in h.items() if k.startswith(prefix)} for h in headers]
    if not body[0]:
        raise ValueError(f"{paths[0]} has no tensors under {prefix!r}: not a {configs[0].model_type} task model")
    for p, b in zip(paths[1:], body[1:]):
        for key in sorted(set(body[0]) ^ set(b)):
            raise ValueError(f"{p if key not in b else paths[0]} lacks body tensor {key!r} that the other has")
        for key, (dtype, shape) in body[0].items():
            if b[key][1] != shape:
                raise ValueError(f"{p}: {key} has shape {b[key][1]}, but {paths[0]} has {shape}")
    keys = [k for k, (dtype, _) in body[0].items() if dtype in FLOAT_DTYPES]
    fixed = [k for k in body[0] if k not in keys]
    for p in own_tensors:
        if not any(fnmatch.fnmatchcase(k, p) for k in keys):
            raise ValueError(
                f"own_tensors pattern {p!r} matches no body tensor of {paths[0]} (names look like "
                f"{keys[0]!r}, {keys[-1]!r})"
            )
    own = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in own_tensors)]
    if len(own) == len(keys):
        raise ValueError(f"own_tensors {list(own_tensors)} match every body tensor: nothing would be merged")
    keys = [k for k in keys if k not in own]
    heads = [[k for k in h if not k.startswith(prefix)] + own for h in headers]
    inputs = Inputs(paths, metadata, tasks, configs[0], prefix, keys, fixed, heads, body[0], headers, own=own)
    inputs.artifacts = check_artifacts(paths, method)
    if "base" in method.needs:
        inputs.base = check_base(base, metadata, inputs, name)
    elif base is not None:
        inputs.base = resolve_model(base)
    return inputs


def check_artifacts(paths: list[Path], method: MergeMethod) -> dict[tuple[int, str], Artifact]:
    """Open (and check against its checkpoint) every artifact the method needs, one line per failure."""
    name = method_name(method)
    out = {}
    for kind in (k for k in FILES if k in method.needs):
        for i, p in enumerate(paths):
            if not artifact_path(p, kind).is_file():
                others = [k for k in FILES if k != kind and artifact_path(p, k).is_file()]
                has = f"; it has {', '.join(others)} (for other methods)" if others else ""
                flag = "" if kind == "mask_fisher" else f" --kind {kind.removesuffix('_fisher')}"
                raise FileNotFoundError(
                    f"method {name} needs a {kind} artifact beside {p} ({FILES[kind]}){has}: "
                    f"compute it with `fmn-pl fisher --checkpoint {p}{flag}`"
                )
            out[(i, kind)] = load_artifact(p, kind)
            task = out[(i, kind)].metadata.get("task")
            if task is not None and task != read_metadata(p)["task"]:
                raise ValueError(
                    f"{artifact_path(p, kind)} was computed for task {task!r}, not {read_metadata(p)['task']!r}"
                )
    return out


def check_base(base: str | None, metadata: list[dict[str, Any]], inputs: Inputs, name: str) -> Path:
    """The pretrained model (given, or the checkpoints' common `base_model`), checked against the body."""
    if base is None:
        recorded = {m.get("base_model") for m in metadata}
        if len(recorded) != 1 or None in recorded:
            raise ValueError(
                f"method {name} needs the pretrained model: pass --base (the checkpoints record "
                f"different base models: {sorted(map(str, recorded))})"
            )
        base = recorded.pop()
        if is_local_path(base) and not Path(base).expanduser().is_dir():
            raise FileNotFoundError(
                f"method {name} needs the pretrained model; the checkpoints record {base}, "
                "which does not exist here: pass --base"
            )
    path = resolve_model(base)
    reader = FileReader(path, prefix=inputs.body_prefix)
    for key in inputs.keys:
        if key not in reader:
            raise ValueError(
                f"base model {base} lacks tensor {key!r}: is it the pretrained model of these checkpoints?"
            )
        if tuple(reader.shape(key)) != inputs.specs[key][1]:
            raise ValueError(
                f"base model {base}: {key} has shape {tuple(reader.shape(key))}, "
                f"but the checkpoints have {inputs.specs[key][1]}"
            )
    return path


def method_name(method: MergeMethod) -> str:
    """The registry name of a method instance (its class path when unregistered)."""
    path = f"{type(method).__module__.removeprefix('fmn_pl.merging.')}:{type(method).__name__}"
    return next((n for n, p in METHODS.items() if p == path), f"{type(method).__module__}.{type(method).__name__}")


# ---------------------------------------------------------------------------------------------- writing


def write_body(
    folder: Path,
    inputs: Inputs,
    merged: Iterable[tuple[str, torch.Tensor]],
    progress: bool = True,
    name: str = BODY_FILE,
) -> Path:
    """Stream the method's (key, tensor) pairs into folder/`name` (in each tensor's original dtype), plus the
    body's non-merged tensors from the first checkpoint."""
    path = folder / name
    writer = SafetensorsWriter(path, {k: inputs.specs[k] for k in inputs.keys + inputs.fixed})
    try:
        for key, tensor in tqdm(
            merged,
            total=len(inputs.keys),
            desc=f"{'merge' if name == BODY_FILE else folder.name} tensors",
            disable=not progress,
        ):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"the merged tensor {key!r} has NaN or Inf entries")
            writer.write(key, tensor.to(torch_dtype(inputs.specs[key][0])))
            del tensor  # not held while the method computes the next one
        first = FileReader(inputs.checkpoints[0])
        for key in inputs.fixed:
            writer.write(key, first.get(key))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return path


def link_or_copy(src: Path, dst: Path, log: Callable[[str], None] = print) -> str:
    """Hard-link `src` to `dst` (no extra disk); copy where the file system has no hard links."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError as e:
        log(f"could not hard-link {src.name} into {dst.parent} ({e}); copying it")
        shutil.copyfile(src, dst)
        return "copy"


def write_task_folder(
    folder: Path,
    i: int,
    inputs: Inputs,
    merge_info: dict[str, Any],
    log: Callable[[str], None],
    body: Iterable[tuple[str, torch.Tensor]] | None = None,
    progress: bool = False,
) -> str:
    """folder/<task>: the merged body (linked) or the task's own `body` (methods such as TALL), the task's own
    head, an index over both, config and tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    task, src = inputs.tasks[i], inputs.checkpoints[i]
    d = folder / task
    d.mkdir()
    reader = FileReader(src)
    head = {k: reader.get(k).contiguous() for k in inputs.heads[i]}
    save_file(head, str(d / TASK_HEAD_FILE), metadata={"format": "pt"})
    os.chmod(d / TASK_HEAD_FILE, (folder / BODY_FILE).stat().st_mode & 0o777)  # safetensors writes 0600
    if body is None:
        how = link_or_copy(folder / BODY_FILE, d / TASK_BODY_FILE, log)
    else:
        os.chmod(
            write_body(d, inputs, body, progress, name=TASK_BODY_FILE), (folder / BODY_FILE).stat().st_mode & 0o777
        )
        how = "own"
    sizes = sum(t.numel() * t.element_size() for t in head.values())
    sizes += sum(_ST_SIZES[dt] * math.prod(s) for dt, s in (inputs.specs[k] for k in inputs.keys + inputs.fixed))
    weight_map = {**{k: TASK_BODY_FILE for k in inputs.keys + inputs.fixed}, **{k: TASK_HEAD_FILE for k in head}}
    write_json(d / INDEX_FILE, {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(weight_map.items()))})
    shutil.copyfile(src / "config.json", d / "config.json")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(d))
    meta = inputs.metadata[i]
    write_json(
        d / METADATA_FILE,
        {
            "format_version": FORMAT_VERSION,
            "task": task,
            **{k: meta[k] for k in ("label_names", "num_labels", "base_model", "data") if k in meta},
            "merged": merge_info,
            "fingerprint": weights_fingerprint(d),
        },
    )
    return how


def write_body_folder(folder: Path, inputs: Inputs) -> None:
    """Config and tokenizer beside model.safetensors, so AutoModel.from_pretrained(folder) loads the body."""
    from transformers import AutoTokenizer

    _, base_class = body_prefix(inputs.config)
    config = copy.deepcopy(inputs.config)
    config.architectures = [base_class]
    config.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(inputs.checkpoints[0])).save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------- the stage


def run_merge(
    checkpoints: list[str],
    method: MergeMethod,
    output: str,
    base: str | None = None,
    overwrite: bool = False,
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
    """

    def log(msg: str) -> None:
        tqdm.write(f"merge: {msg}")

    for option, value in (
        ("max_eval_samples", max_eval_samples),
        ("selection_samples", selection_samples),
        ("batch_size", batch_size),
        ("selection_screen", selection_screen),
        ("selection_finalists", selection_finalists),
    ):
        check_count(option, value)
    start = time.perf_counter()
    set_mmap_threshold()
    reset_peak()  # the merge's own peak, also when it runs inside a pipeline process
    name = method_name(method)
    out = Path(output)
    for c in checkpoints:
        if out.resolve() == Path(c).resolve() or Path(c).resolve().is_relative_to(out.resolve()):
            raise ValueError(f"output {out} would replace the input checkpoint {c}")
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out} already exists and is not empty; pass --overwrite true to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    if evaluate and is_local_path(data_dir) and not Path(data_dir).expanduser().is_dir():  # now, not after merging
        raise FileNotFoundError(f"data directory {Path(data_dir).expanduser()} does not exist")
    inputs = check_inputs(checkpoints, method, base, own_tensors or ())
    fingerprints = [weights_fingerprint(p) for p in inputs.checkpoints]
    for p, m, fp in zip(inputs.checkpoints, inputs.metadata, fingerprints):
        if m.get("fingerprint") not in (None, fp):
            raise ValueError(
                f"{p}: its weights changed since export ({METADATA_FILE} records {m['fingerprint']}, "
                f"the files hash to {fp})"
            )

    from fmn_pl.evaluate import EvalCache, EvalData, Evaluator  # after the checks: tokenizers, metrics, Lightning
    from fmn_pl.report import summary, write_report

    selection_split = resolve_selection_split(selection_split, inputs.metadata)
    selection = Evaluator(
        inputs.checkpoints,
        EvalData(data_dir, selection_split, selection_samples, batch_size),
        accelerator,
        progress=False,
        precision=selection_precision,
    )
    selection_calls, adapted = 0, False

    def select(
        body: dict[str, torch.Tensor], tasks: Sequence[str] | None = None, limit: int | None = None
    ) -> dict[str, float]:
        nonlocal selection_calls
        selection_calls += 1
        with scoring_memory():
            return selection.scores(body, tasks, limit)

    def selection_inputs(i: int) -> Any:
        nonlocal adapted
        adapted = True
        return selection.datamodule(i)

    ctx = inputs.context(
        evaluate=select,
        selection_inputs=selection_inputs,
        accelerator=accelerator,
        progress=progress,
        log=log,
        finalists=selection_finalists,
        screen=None
        if selection_samples is not None and selection_samples <= (selection_screen or 0)
        else selection_screen,
    )
    merge_info = {
        "method": name,
        "options": method.options(),
        "checkpoints": [str(p) for p in inputs.checkpoints],
        "fingerprints": fingerprints,
    }
    report: dict[str, Any] = {
        "method": name,
        "label": label or name,
        "options": method.options(),
        "tasks": inputs.tasks,
        "checkpoints": [
            {
                "task": t,
                "path": str(p),
                "fingerprint": fp,
                "artifacts": {
                    k: {key: v for key, v in a.metadata.items()}
                    for (i, k), a in (inputs.artifacts or {}).items()
                    if i == j
                },
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
    timings: dict[str, float] = {"check_s": time.perf_counter() - start}

    with atomic_dir(out, overwrite=overwrite) as tmp:
        ctx.workdir = tmp / name
        t0 = time.perf_counter()
        write_body(tmp, inputs, method.merge(ctx), progress)
        timings["merge_s"] = time.perf_counter() - t0
        report["peak_rss_merge_mb"] = peak_rss_mb()
        if save_model:
            write_body_folder(tmp, inputs)
        links = [
            write_task_folder(tmp, i, inputs, merge_info, log, method.task_body(i, ctx), progress)
            for i in range(len(inputs.tasks))
        ]
        report["storage"] = {"body_bytes": (tmp / BODY_FILE).stat().st_size, "task_body": sorted(set(links))}
        timings["write_s"] = time.perf_counter() - t0 - timings["merge_s"]
        if selection_calls or adapted:
            report["selection"] = {
                **selection.data.identity(),
                "evaluations": selection_calls,
                "adapted": adapted,
                "bf16": selection.bf16(),
                "transductive": selection_split == "validation",
            }
        report["notes"] = _jsonable(ctx.notes)
        report["remarks"] = list(ctx.remarks)
        del ctx

        if evaluate:
            t0 = time.perf_counter()
            report["evaluation"] = EvalData(data_dir, "validation", max_eval_samples, batch_size).identity()
            evaluator = Evaluator(
                inputs.checkpoints,
                EvalData(data_dir, "validation", max_eval_samples, batch_size),
                accelerator,
                progress,
            )
            with scoring_memory():
                report["results"] = evaluate_all(
                    tmp,
                    inputs,
                    fingerprints,
                    evaluator,
                    EvalCache(cache, log),
                    compare_average,
                    reuse_average=_is_plain_average(method),
                    progress=progress,
                    log=log,
                )
            report["summary"] = summary(report["results"])
            res = report["results"].values()
            if not _is_plain_average(method) and all(r["average"] and r["merged"] == r["average"] for r in res):
                report["remarks"].append(
                    "the merged model scores exactly as the plain average on every task: "
                    "the method changed nothing these examples can show"
                )
                log(f"warning: {report['remarks'][-1]}")
            timings["eval_s"] = time.perf_counter() - t0
        if not save_model:
            (tmp / BODY_FILE).unlink()
            for task in inputs.tasks:
                shutil.rmtree(tmp / task)
        timings["total_s"] = time.perf_counter() - start
        report["timings"] = timings
        report["peak_rss_mb"] = peak_rss_mb()
        report["versions"] = _versions()
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        write_report(tmp, report)
    if evaluate:
        s = report["summary"]
        fmt = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
        log(
            f"{name}: mean score {fmt(s['merged_score'])} (average {fmt(s['average_score'])}, individual "
            f"{fmt(s['individual_score'])}); report: {out / 'report.md'}"
        )
    else:
        log(f"{name}: merged in {timings['merge_s']:.1f} s; output: {out}")
    return report


def resolve_selection_split(split: str, metadata: list[dict[str, Any]]) -> str:
    """`auto` -> holdout when every checkpoint held training rows out, else validation; other splits unchanged."""
    if split != "auto":
        return split
    held = all(int((m.get("data") or {}).get("holdout_samples") or 0) > 0 for m in metadata)
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
    from fmn_pl.evaluate import EvalData, Evaluator

    if type(method).task_body is not MergeMethod.task_body:
        raise ValueError(f"method {method_name(method)} gives each task its own body: use run_merge, not merge_body")
    log = log or (lambda msg: tqdm.write(f"merge: {msg}"))
    inputs = check_inputs(checkpoints, method, base, own_tensors)
    if selection is None:
        split = resolve_selection_split(selection_split, inputs.metadata)
        selection = Evaluator(
            inputs.checkpoints, EvalData(data_dir, split, selection_samples, batch_size), accelerator, progress=False
        )
    if missing := [t for t in inputs.tasks if t not in selection.tasks]:
        raise ValueError(f"the selection evaluator has no checkpoint of task(s) {missing}")
    where = [selection.tasks.index(t) for t in inputs.tasks]

    def select(
        body: dict[str, torch.Tensor], tasks: Sequence[str] | None = None, limit: int | None = None
    ) -> dict[str, float]:
        return {
            t: selection.evaluate(where[inputs.tasks.index(t)], body=body, limit=limit)["score"]
            for t in tasks or inputs.tasks
        }

    ctx = inputs.context(
        evaluate=select,
        selection_inputs=lambda i: selection.datamodule(where[i]),
        accelerator=accelerator,
        progress=False,
        log=log,
    )
    body = {}
    for key, tensor in method.merge(ctx):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"the merged tensor {key!r} has NaN or Inf entries")
        body[key] = tensor.to(torch_dtype(inputs.specs[key][0]))
    for key in inputs.fixed:
        body[key] = ctx.readers[0].get(key)
    if notes is not None:
        notes.update(_jsonable(ctx.notes))
    return body


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
    for i, task in enumerate(tqdm(inputs.tasks, desc="evaluate tasks", disable=not progress)):
        merged[task] = evaluator.evaluate(i, model_dir=folder / task)
        key = {"what": "individual", "fingerprint": fingerprints[i], **evaluator.identity(i)}
        individual[task] = cache.get(inputs.checkpoints[i], key)
        if individual[task] is None:
            individual[task] = evaluator.evaluate(i)
            cache.put(inputs.checkpoints[i], key, individual[task])
    if compare_average:
        own = {"own_tensors": inputs.own} if inputs.own else {}  # the average keeps them too: another baseline
        keys = [
            {"what": "average", "fingerprints": fingerprints, **own, **evaluator.identity(i)}
            for i in range(len(inputs.tasks))
        ]
        if reuse_average:
            average = dict(merged)
        else:
            average = {t: cache.get(inputs.checkpoints[i], keys[i]) for i, t in enumerate(inputs.tasks)}
            todo = [i for i, t in enumerate(inputs.tasks) if average[t] is None]
            if todo:
                body = dict(Average().merge(inputs.context(log=log)))
                for i in tqdm(todo, desc="evaluate average", disable=not progress):
                    average[inputs.tasks[i]] = evaluator.evaluate(i, body=body)
                del body
        for i, t in enumerate(inputs.tasks):
            cache.put(inputs.checkpoints[i], keys[i], average[t])
    baselines = [evaluator.baseline(i) for i in range(len(inputs.tasks))]
    results = {
        t: task_result(merged[t], individual[t], average.get(t), *baselines[i]) for i, t in enumerate(inputs.tasks)
    }
    for t, r in results.items():
        for flag in r["flags"]:
            log(f"warning: {t}: {flag}")
    return results


def _is_plain_average(method: MergeMethod) -> bool:
    from fmn_pl.merging.average import Average

    return type(method) is Average and not getattr(method, "coefficients", None)


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


# ---------------------------------------------------------------------------------------------- CLI


def class_path(name: str) -> str:
    """A registry name (or a registered class's name) -> its importable class path; dotted paths unchanged."""
    if "." in name:
        return name
    for key, target in METHODS.items():
        module, cls = target.split(":")
        if name in (key, cls):
            return f"fmn_pl.merging.{module}.{cls}"
    from fmn_pl.merging import method_class

    method_class(name)  # raises: unknown merge method, with the known names
    return name


def _rewrite_config(text: str) -> str:
    """A YAML config with `method: fmn` or `method: {class_path: fmn, ...}` rewritten to class paths."""
    import yaml

    data = yaml.safe_load(text)
    if isinstance(data, dict):
        m = data.get("method")
        if isinstance(m, str):
            data["method"] = {"class_path": class_path(m)}
        elif isinstance(m, dict) and isinstance(m.get("class_path"), str):
            m["class_path"] = class_path(m["class_path"])
    return yaml.safe_dump(data, sort_keys=False)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Accept `--checkpoints a b c`, registry names for `--method` (also in --config files) and `--no_eval`."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        if a == "--no_eval":
            out.append("--evaluate=false")
        elif flag == "--checkpoints" and not eq and i + 1 < len(args) and not args[i + 1].startswith("["):
            items = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                items.append(args[i + 1])
                i += 1
            out.append("--checkpoints=" + json.dumps(items))
        elif flag in ("--method", "--method.help"):
            if not eq and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            out.append(f"{flag}={class_path(value)}")
        elif flag == "--config":
            if not eq and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            path = Path(value)
            if not path.is_file():
                raise FileNotFoundError(f"config file {value} does not exist")
            out += ["--config", _rewrite_config(path.read_text())]
        else:
            out.append(a)
        i += 1
    return out


def _method_lines() -> str:
    from fmn_pl.merging import summary

    lines = []
    for name in METHODS:
        try:
            doc = summary(name)
        except Exception as e:  # a broken method module must not break the others' CLI
            doc = f"(cannot read: {e})"
        lines.append(f"  {name:<17} {doc}")
    return "\n".join(lines)


def build_parser() -> Any:
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class Formatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
        """Keeps the description's line breaks (the method list)."""

    parser = ArgumentParser(
        formatter_class=Formatter,
        prog="fmn-pl merge",
        description="Merge task checkpoints' bodies, evaluate every task with its own head, report.\n\n"
        "Methods (--method NAME; options as --method.OPTION VALUE; `--method NAME --help` lists them):\n"
        + _method_lines(),
        exit_on_error=False,  # one line at the CLI's error boundary, not the usage
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (configs/merge/*.yaml)")
    parser.add_function_arguments(run_merge, as_group=False, skip={"config_yaml"})
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """`fmn-pl merge ...`: the report of `run_merge`; bad input raises (one line at `fmn_pl.cli.shell`)."""
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    if any(a in ("-h", "--help") for a in args):
        method = next((a.partition("=")[2] for a in args if a.startswith("--method=")), None)
        if method:  # that method's options only, one line each
            from fmn_pl.merging import METHODS, option_lines

            method = next((n for n, t in METHODS.items() if method.endswith(t.replace(":", "."))), method)
            print("\n".join(option_lines(method)))
        else:
            build_parser().print_help()
        return None
    parser = build_parser()
    cfg = parser.parse_args(args)
    config_yaml = parser.dump(cfg, skip_none=False)
    init = parser.instantiate(cfg)
    return run_merge(**{k: v for k, v in vars(init).items() if k != "config"}, config_yaml=config_yaml)
