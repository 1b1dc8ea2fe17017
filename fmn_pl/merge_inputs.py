"""What a merge reads, checked before any work: at least two checkpoints of distinct tasks, one architecture,
vocabulary and tokenizer, the artifacts the method needs (present, of the right kind, computed on these weights),
and the base model when the method needs one (`check_inputs` -> `Inputs`, the merge context's source)."""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from fmn_pl.artifacts import Artifact, artifact_path, load_artifact
from fmn_pl.checkpoint import CheckpointMeta, weights_fingerprint
from fmn_pl.files import sha256_json
from fmn_pl.kinds import KINDS, fisher_command
from fmn_pl.merging import METHODS, MergeContext, MergeMethod
from fmn_pl.options import check_checkpoint_folder, is_local_path
from fmn_pl.tensorfile import FLOAT_DTYPES, CheckpointReader

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


# ---------------------------------------------------------------------------------------------- safetensors I/O


def tensor_specs(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a model folder's model*.safetensors, read from the headers only."""
    reader = CheckpointReader(folder)
    return {k: (reader.dtype(k), reader.shape(k)) for k in reader.keys()}


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Checked inputs of a merge."""

    checkpoints: list[Path]
    metadata: list[CheckpointMeta]
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
    fingerprints: list[str] | None = None  # the checkpoints' weight fingerprints, when they were needed

    def context(self, **kw: Any) -> MergeContext:
        """A merge context over these checkpoints (plain-read, base model when given, checked artifacts);
        `kw` sets the rest (evaluate, selection_inputs, accelerator, progress, log)."""
        return MergeContext(
            checkpoints=self.checkpoints,
            tasks=self.tasks,
            config=self.config,
            body_prefix=self.body_prefix,
            keys=list(self.keys),
            readers=[CheckpointReader(p) for p in self.checkpoints],
            base_reader=CheckpointReader(self.base, prefix=self.body_prefix) if self.base else None,
            _artifacts=dict(self.artifacts or {}),
            **kw,
        )


def body_prefix(config: Any, keys: Iterable[str] = ()) -> tuple[str, str]:
    """("bert.", "BertModel"): the parameter prefix of the base model inside the task model, and its class.

    With the task model's tensor `keys` and a model type transformers names: the keys' most common first part
    (the body has more tensors than the head) and the name table, without importing the model's code (2 s);
    otherwise from the task model built on the meta device."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    base_class = MODEL_MAPPING_NAMES.get(config.model_type)
    firsts = Counter(k.split(".", 1)[0] for k in keys if "." in k)
    if firsts and isinstance(base_class, str):
        return f"{firsts.most_common(1)[0][0]}.", base_class
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
    return sha256_json([type(tok).__name__.removesuffix("Fast"), sorted(tok.get_vocab().items()), probe])


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
    checkpoints: Sequence[str | Path],
    method: MergeMethod,
    base: str | None,
    own_tensors: Sequence[str] = (),
    fingerprints: bool = False,
) -> Inputs:
    """Every check a merge needs before it starts, with a one-line error naming the culprit. Body tensors that
    match an `own_tensors` pattern are not merged: each task keeps its own, as part of its head. The checkpoints'
    weight fingerprints are hashed once, when asked for (`fingerprints`) or when the method's artifacts need them."""
    paths = [Path(c) for c in checkpoints]
    if len(paths) < 2:
        raise ValueError(f"merging needs at least two checkpoints, got {len(paths)}")
    metadata = check_tasks(paths)
    configs = check_architectures(paths)
    headers = [tensor_specs(p) for p in paths]
    prefix, _ = body_prefix(configs[0], headers[0])
    body = check_bodies(paths, headers, prefix, configs[0].model_type)
    keys = [k for k, (dtype, _) in body.items() if dtype in FLOAT_DTYPES]
    fixed = [k for k in body if k not in keys]
    own = own_keys(keys, own_tensors, paths[0])
    keys = [k for k in keys if k not in own]
    heads = [[k for k in h if not k.startswith(prefix)] + own for h in headers]
    tasks = [m.task for m in metadata]
    hashed = None
    if fingerprints or any(kind in method.needs for kind in KINDS):
        hashed = [weights_fingerprint(p) for p in paths]
    artifacts = check_artifacts(paths, tasks, method, hashed)
    base_path: Path | None = None
    if "base" in method.needs:
        base_path = check_base(base, metadata, prefix, {k: body[k][1] for k in keys}, method_name(method))
    elif base is not None:
        base_path = resolve_model(base)
    return Inputs(
        paths, metadata, tasks, configs[0], prefix, keys, fixed, heads, body, headers, base_path, artifacts, own, hashed
    )


def check_tasks(paths: list[Path]) -> list[CheckpointMeta]:
    """Each checkpoint's metadata; each task at most once (its head, output folder and report row are keyed by it)."""
    metadata = [CheckpointMeta.read(check_checkpoint_folder(p)) for p in paths]
    tasks = [m.task for m in metadata]
    for j, t in enumerate(tasks):
        if t in tasks[:j]:
            raise ValueError(
                f"{paths[tasks.index(t)]} and {paths[j]} are both task {t!r}: each task may appear once "
                "(its head, output folder and report row are keyed by task)"
            )
    return metadata


def check_architectures(paths: list[Path]) -> list[Any]:
    """The checkpoints' configs, refused unless they share one architecture and one tokenizer."""
    from transformers import AutoConfig

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
    return configs


def check_bodies(
    paths: list[Path], headers: list[dict[str, tuple[str, tuple[int, ...]]]], prefix: str, model_type: str
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The body tensors (name -> dtype, shape) every checkpoint has, refused where they differ."""
    body = [{k: v for k, v in h.items() if k.startswith(prefix)} for h in headers]
    if not body[0]:
        raise ValueError(f"{paths[0]} has no tensors under {prefix!r}: not a {model_type} task model")
    for p, b in zip(paths[1:], body[1:]):
        for key in sorted(set(body[0]) ^ set(b)):
            raise ValueError(f"{p if key not in b else paths[0]} lacks body tensor {key!r} that the other has")
        for key, (_, shape) in body[0].items():
            if b[key][1] != shape:
                raise ValueError(f"{p}: {key} has shape {b[key][1]}, but {paths[0]} has {shape}")
    return body[0]


def own_keys(keys: list[str], own_tensors: Sequence[str], first: Path) -> list[str]:
    """The body tensors matched by an `own_tensors` pattern (each pattern must match one; not all may match)."""
    for p in own_tensors:
        if not any(fnmatch.fnmatchcase(k, p) for k in keys):
            raise ValueError(
                f"own_tensors pattern {p!r} matches no body tensor of {first} (names look like "
                f"{keys[0]!r}, {keys[-1]!r})"
            )
    own = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in own_tensors)]
    if len(own) == len(keys):
        raise ValueError(f"own_tensors {list(own_tensors)} match every body tensor: nothing would be merged")
    return own


def check_artifacts(
    paths: list[Path], tasks: list[str], method: MergeMethod, fingerprints: list[str] | None = None
) -> dict[tuple[int, str], Artifact]:
    """Open (and check against its checkpoint's `fingerprints`, hashed here if not given, and its `tasks`) every
    artifact the method needs, one line per failure."""
    name = method_name(method)
    out = {}
    for kind in (k for k in KINDS if k in method.needs):
        for i, p in enumerate(paths):
            if not artifact_path(p, kind).is_file():
                others = [k for k in KINDS if k != kind and artifact_path(p, k).is_file()]
                has = f"; it has {', '.join(others)} (for other methods)" if others else ""
                raise FileNotFoundError(
                    f"method {name} needs a {kind} artifact beside {p} ({KINDS[kind].file}){has}: "
                    f"compute it with `{fisher_command(p, kind)}`"
                )
            out[(i, kind)] = load_artifact(p, kind, fingerprint=fingerprints[i] if fingerprints else None)
            task = out[(i, kind)].metadata.get("task")
            if task is not None and task != tasks[i]:
                raise ValueError(f"{artifact_path(p, kind)} was computed for task {task!r}, not {tasks[i]!r}")
    return out


def check_base(
    base: str | None, metadata: list[CheckpointMeta], prefix: str, shapes: dict[str, tuple[int, ...]], name: str
) -> Path:
    """The pretrained model (given, or the checkpoints' common `base_model`), checked against the merged body's
    tensor `shapes` (under `prefix`)."""
    if base is None:
        recorded = {m.base_model for m in metadata}
        if len(recorded) != 1:
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
    reader = CheckpointReader(path, prefix=prefix)
    for key, shape in shapes.items():
        if key not in reader:
            raise ValueError(
                f"base model {base} lacks tensor {key!r}: is it the pretrained model of these checkpoints?"
            )
        if tuple(reader.shape(key)) != shape:
            raise ValueError(
                f"base model {base}: {key} has shape {tuple(reader.shape(key))}, but the checkpoints have {shape}"
            )
    return path


def method_name(method: MergeMethod) -> str:
    """The registry name of a method instance (its class path when unregistered)."""
    path = f"{type(method).__module__.removeprefix('fmn_pl.merging.')}:{type(method).__name__}"
    return next((n for n, p in METHODS.items() if p == path), f"{type(method).__module__}.{type(method).__name__}")
