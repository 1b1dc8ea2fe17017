"""The failure matrix from the shell (`python -m fmn_pl.cli ...`, as a user or a cluster job runs it): every bad
input to fit, fisher, merge and pipeline ends with exit status 2 and exactly one line, `fmn-pl COMMAND: error:`,
that names the option or file; no traceback, and no output (nor a hidden temp folder) left behind.

`pytest tests/test_reliability.py -v` prints one line per case: the table of the closing note. Interrupts
(SIGTERM/SIGINT) are in test_interrupts.py; the units behind these messages in test_failures.py and
test_bad_counts.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.conftest import tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

# (case id, command line with {placeholders}, what the one line must contain). {out} must not exist afterwards.
CASES: list[tuple[str, str, str]] = [
    # fit
    (
        "fit-unknown-task",
        "fit --model.model_name_or_path={base} --data.task=qqq --data.data_dir={glue}",
        "unknown GLUE task 'qqq'",
    ),
    (
        "fit-negative-cap",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} "
        "--data.max_train_samples=-5 --export.dirpath={out}",
        "max_train_samples",
    ),
    (
        "fit-zero-cap",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} "
        "--data.max_train_samples=0 --export.dirpath={out}",
        "max_train_samples",
    ),
    (
        "fit-zero-batch",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} "
        "--data.batch_size=0 --export.dirpath={out}",
        "batch_size",
    ),
    (
        "fit-devices-abc",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} "
        "--trainer.devices=abc --export.dirpath={out}",
        "devices",
    ),
    ("fit-yaml-syntax", "fit --config={bad_yaml}", "YAML syntax error"),
    (
        "fit-missing-data",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={missing} --export.dirpath={out}",
        "does not exist",
    ),
    (
        "fit-missing-model",
        "fit --model.model_name_or_path={missing} --data.task=rte --data.data_dir={glue} --export.dirpath={out}",
        "missing",
    ),
    ("fit-unknown-option", "fit --model.model_name_or_path={base} --data.task=rte --bogus=1", "bogus"),
    (
        "fit-export-unwritable",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} "
        "--trainer.max_epochs=1 --export.dirpath={file}/out",
        "not a folder",
    ),
    (
        "fit-pickled-ckpt",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} "
        "--export.dirpath={out} --ckpt_path={pickle}",
        "is not a checkpoint that `fmn-pl fit` saved",
    ),
    # fisher
    ("fisher-missing-checkpoint", "fisher --checkpoint={missing} --data_dir={glue}", "missing"),
    ("fisher-negative-examples", "fisher --checkpoint={ck1} --data_dir={glue} --num_examples=-5", "num_examples"),
    ("fisher-zero-examples", "fisher --checkpoint={ck1} --data_dir={glue} --num_examples=0", "num_examples"),
    ("fisher-zero-batch", "fisher --checkpoint={ck1} --data_dir={glue} --batch_size=0", "batch_size"),
    ("fisher-unknown-kind", "fisher --checkpoint={ck1} --data_dir={glue} --kind=bogus", "kind"),
    ("fisher-truncated-weights", "fisher --checkpoint={truncated} --data_dir={glue}", "model.safetensors"),
    ("fisher-config-mismatch", "fisher --checkpoint={mismatch} --data_dir={glue}", "config.json disagrees"),
    ("fisher-yaml-syntax", "fisher --config={bad_yaml}", "YAML syntax error"),
    ("fisher-unknown-option", "fisher --checkpoint={ck1} --bogus=1", "bogus"),
    # merge
    (
        "merge-one-checkpoint",
        "merge --method=average --checkpoints {ck1} --output={out} --data_dir={glue}",
        "at least two checkpoints",
    ),
    (
        "merge-missing-checkpoint",
        "merge --method=average --checkpoints {ck1} {missing} --output={out} --data_dir={glue}",
        "missing",
    ),
    ("merge-unknown-method", "merge --method=bogus --checkpoints {ck1} {ck2} --output={out}", "bogus"),
    (
        "merge-unknown-method-option",
        "merge --method=fmn --method.bogus=1 --checkpoints {ck1} {ck2} --output={out}",
        "bogus",
    ),
    (
        "merge-negative-eval",
        "merge --method=average --checkpoints {ck1} {ck2} --output={out} --data_dir={glue} --eval.max_samples=-3",
        "eval.max_samples",
    ),
    (
        "merge-zero-batch",
        "merge --method=average --checkpoints {ck1} {ck2} --output={out} --data_dir={glue} --batch_size=0",
        "batch_size",
    ),
    (
        "merge-zero-selection",
        "merge --method=average --checkpoints {ck1} {ck2} --output={out} --data_dir={glue} --selection.samples=0",
        "selection.samples",
    ),
    (
        "merge-no-fisher",
        "merge --method=fmn --checkpoints {ck1} {nofisher} --output={out} --data_dir={glue}",
        "mask_fisher",
    ),
    (
        "merge-integer-fisher",
        "merge --method=fmn --checkpoints {ck1} {intfisher} --output={out} --data_dir={glue}",
        "int64",
    ),
    ("merge-nan-fisher", "merge --method=fmn --checkpoints {ck1} {nanfisher} --output={out} --data_dir={glue}", "NaN"),
    (
        "merge-stale-fisher",
        "merge --method=fmn --checkpoints {ck1} {stale} --output={out} --data_dir={glue}",
        "recompute it",
    ),
    (
        "merge-weights-changed",
        "merge --method=average --checkpoints {ck1} {changed} --output={out} --data_dir={glue}",
        "its weights changed since export",
    ),
    (
        "merge-output-is-input",
        "merge --method=average --checkpoints {ck1} {ck2} --output={ck1} --data_dir={glue}",
        "replace the input checkpoint",
    ),
    (
        "merge-output-occupied",
        "merge --method=average --checkpoints {ck1} {ck2} --output={occupied} --data_dir={glue}",
        "already exists",
    ),
    (
        "merge-output-unwritable",
        "merge --method=average --checkpoints {ck1} {ck2} --output={file}/out --data_dir={glue}",
        "not a folder",
    ),
    ("merge-yaml-syntax", "merge --config={bad_yaml}", "YAML syntax error"),
    (
        "merge-missing-data",
        "merge --method=average --checkpoints {ck1} {ck2} --output={out} --data_dir={missing}",
        "does not exist",
    ),
    # pipeline
    ("pipeline-missing-config", "pipeline --config={missing}", "missing"),
    ("pipeline-yaml-syntax", "pipeline --config={bad_yaml}", "YAML syntax error"),
    ("pipeline-unknown-task", "pipeline --config={pipeline} --tasks=[rte,qqq]", "qqq"),
    ("pipeline-negative-cap", "pipeline --config={pipeline} --fit.max_train_samples=-5", "max_train_samples"),
    ("pipeline-unknown-method", 'pipeline --config={pipeline} --merge.methods=[{{"name":"bogus"}}]', "bogus"),
    ("pipeline-unknown-option", "pipeline --config={pipeline} --bogus=1", "bogus"),
    ("pipeline-output-unwritable", "pipeline --config={pipeline} --output={file}/out", "not a folder"),
    # issue 29: file-vs-folder, empty configs, YAML NaN, pytorch_model.bin only, devices, positions, nesting
    (
        "merge-checkpoint-is-a-file",
        "merge --method=average --checkpoints {file} {ck2} --output={out} --data_dir={glue}",
        "task checkpoint {file} is a file, not a folder",
    ),
    ("fisher-checkpoint-is-a-file", "fisher --checkpoint={file} --data_dir={glue}", "is a file, not a folder"),
    *(
        (f"{command}-config-{kind}", f"{command} --config={{{kind}}}{rest}", expect)
        for command, rest in (
            ("fit", ""),
            ("fisher", " --checkpoint={ck1}"),
            ("merge", " --checkpoints {ck1} {ck2} --output={out}"),
            ("pipeline", ""),
        )
        for kind, expect in (("folder", "is a folder, not a YAML file"), ("empty_yaml", "is empty: it sets no options"))
    ),
    (
        "merge-yaml-nan",
        "merge --method=task_arithmetic --method.scaling=.nan --checkpoints {ck1} {ck2} --output={out} "
        "--data_dir={glue}",
        "method.scaling is nan",
    ),
    (
        "fit-yaml-nan",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} --model.learning_rate=.nan "
        "--export.dirpath={out}",
        "model.learning_rate is nan",
    ),
    ("fisher-pytorch-bin-only", "fisher --checkpoint={binonly} --data_dir={glue}", "pytorch_model.bin only"),
    (
        "merge-pytorch-bin-only",
        "merge --method=average --checkpoints {ck1} {binonly} --output={out} --data_dir={glue}",
        "pytorch_model.bin only",
    ),
    ("fisher-devices-abc", "fisher --checkpoint={ck1} --data_dir={glue} --trainer.devices=abc", "devices"),
    (
        "fit-max-length-above-positions",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} --data.max_length=100000 "
        "--export.dirpath={out}",
        "max_length 100000 is above the 130 positions",
    ),
    (
        "fisher-max-length-above-positions",
        "fisher --checkpoint={ck1} --data_dir={glue} --max_length=100000",
        "max_length 100000 is above the 130 positions",
    ),
    (
        "merge-output-inside-input",
        "merge --method=average --checkpoints {ck1} {ck2} --output={ck2}/merged --data_dir={glue}",
        "is inside the input checkpoint",
    ),
    (
        "fit-export-inside-model",
        "fit --model.model_name_or_path={ck1} --data.task=rte --data.data_dir={glue} --export.dirpath={ck1}/again",
        "is inside the model",
    ),
    (
        "fit-ckpt-last-without-checkpoint",
        "fit --model.model_name_or_path={base} --data.task=rte --data.data_dir={glue} --export.dirpath={out} "
        "--ckpt_path=last",
        "--ckpt_path last: no interrupted fit",
    ),
]


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Callable[[str], Path], tiny_glue: Path
) -> dict[str, str]:
    """Tiny checkpoints with Fisher artifacts, and broken variants of them."""

    from fmn_pl.artifacts import artifact_path, load_artifact, save_artifact
    from fmn_pl.checkpoint import weights_fingerprint
    from fmn_pl.fisher_cli import main as fisher

    root = tmp_path_factory.mktemp("reliability")
    base = tiny_base("bert")

    def checkpoint(name: str, task: str, seed: int, with_fisher: bool = True) -> Path:
        ck = tiny_checkpoint(base, task, root / name, seed, noise=0.0)
        if with_fisher:
            fisher(
                [
                    f"--checkpoint={ck}",
                    f"--data_dir={tiny_glue}",
                    "--num_examples=8",
                    "--trainer.accelerator=cpu",
                    "--trainer.enable_progress_bar=false",
                ]
            )
        return ck

    p = {
        "base": base,
        "glue": tiny_glue,
        "missing": root / "missing",
        "ck1": checkpoint("rte", "rte", 0),
        "ck2": checkpoint("mrpc", "mrpc", 1),
        "nofisher": checkpoint("nofisher", "mrpc", 2, with_fisher=False),
    }
    fisher_of = load_artifact(p["ck2"], "mask_fisher")
    for name, transform in (("intfisher", lambda t: t.to(torch.int64)), ("nanfisher", lambda t: t * float("nan"))):
        ck = p[name] = checkpoint(name, "mrpc", 3, with_fisher=False)
        meta = {"kind": "mask_fisher", "task": "mrpc", "fingerprint": weights_fingerprint(ck), "num_examples": 8}
        save_artifact(
            artifact_path(ck, "mask_fisher"), {k: transform(fisher_of.get(k)) for k in fisher_of.keys()}, meta
        )
    p["stale"] = checkpoint("stale", "mrpc", 4)
    with torch.no_grad():  # retrain after the Fisher pass: its fingerprint no longer matches
        from safetensors.torch import load_file, save_file

        weights = load_file(p["stale"] / "model.safetensors")
        save_file(
            {k: v + 0.01 for k, v in weights.items()}, p["stale"] / "model.safetensors", metadata={"format": "pt"}
        )
        meta = json.loads((p["stale"] / "fmn_pl.json").read_text())
        meta["fingerprint"] = weights_fingerprint(p["stale"])
        (p["stale"] / "fmn_pl.json").write_text(json.dumps(meta))
    p["changed"] = checkpoint("changed", "mrpc", 7, with_fisher=False)  # its record names other weights
    meta = json.loads((p["changed"] / "fmn_pl.json").read_text())
    (p["changed"] / "fmn_pl.json").write_text(json.dumps({**meta, "fingerprint": "0" * 16}))
    p["truncated"] = checkpoint("truncated", "rte", 5, with_fisher=False)
    data = (p["truncated"] / "model.safetensors").read_bytes()
    (p["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    p["mismatch"] = checkpoint("mismatch", "rte", 6, with_fisher=False)
    config = json.loads((p["mismatch"] / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (p["mismatch"] / "config.json").write_text(json.dumps(config))
    p["occupied"] = root / "occupied"
    p["occupied"].mkdir()
    (p["occupied"] / "keep.txt").write_text("a user's file")
    p["file"] = root / "a-file"
    p["file"].write_text("not a folder")
    p["pickle"] = root / "not-lightning.ckpt"  # a pickle of a class: no weights-only load
    p["pickle"].write_bytes(__import__("pickle").dumps({"state": object}))
    p["binonly"] = checkpoint("binonly", "rte", 8, with_fisher=False)  # weights as pytorch_model.bin only
    torch.save(load_file(p["binonly"] / "model.safetensors"), p["binonly"] / "pytorch_model.bin")
    (p["binonly"] / "model.safetensors").unlink()
    p["folder"] = root / "a-folder"
    p["folder"].mkdir()
    p["empty_yaml"] = root / "empty.yaml"
    p["empty_yaml"].write_text("# nothing set\n")
    p["bad_yaml"] = root / "bad.yaml"
    p["bad_yaml"].write_text("method: [fmn\n  x: : y\n")
    p["pipeline"] = root / "pipeline.yaml"
    p["pipeline"].write_text(
        f"output: {root / 'pipeline-out'}\nmodel: {base}\ndata_dir: {tiny_glue}\n"
        "tasks: [rte, mrpc]\nmerge:\n  methods: [{name: average}]\n"
    )
    return {k: str(v) for k, v in p.items()}


@pytest.mark.parametrize("case,command,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(inputs: dict[str, str], tmp_path: Path, case: str, command: str, expect: str) -> None:
    out = tmp_path / "out"
    argv = [a.format(out=out, **inputs) for a in command.split(" ")]
    expect = expect.format(**inputs)
    before = {p: sorted(os.listdir(p)) for p in (inputs["ck1"], inputs["ck2"], inputs["occupied"], inputs["base"])}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("FMN_PL_TRACEBACK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    command_name = argv[0]
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith(f"fmn-pl {command_name}: error: "), proc.stderr[-2000:]
    assert expect in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())
    assert {p: sorted(os.listdir(p)) for p in before} == before  # nothing written beside the inputs


# (command, target the other writer holds, lock inside it): a second writer of one output, refused in one line
BUSY = [
    ("merge --method=average --checkpoints {ck1} {ck2} --output={out} --data_dir={glue}", "{out}", False),
    ("fisher --checkpoint={ck1} --data_dir={glue} --num_examples=8", "{ck1}/mask_fisher.safetensors", False),
    ("pipeline --config={pipeline} --output={out}", "{out}", True),
]


@pytest.mark.parametrize("command,target,inside", BUSY, ids=[c[0].split()[0] for c in BUSY])
def test_second_writer_is_one_line(inputs: dict[str, str], tmp_path: Path, command: str, target: str, inside: bool):
    held = target.format(out=tmp_path / "out", **inputs)
    before = sorted(os.listdir(inputs["ck1"]))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom fmn_pl.files import output_lock\n"
         "with output_lock(sys.argv[1], inside=sys.argv[2] == 'True'):\n    print('held', flush=True)\n"
         "    sys.stdin.readline()", held, str(inside)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    argv = [a.format(out=tmp_path / "out", **inputs) for a in command.split(" ")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("FMN_PL_TRACEBACK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    holder.communicate("\n", timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"fmn-pl {argv[0]}: error: {held} is being written by process {holder.pid} on "), lines
    assert sorted(os.listdir(inputs["ck1"])) == before and not (tmp_path / "out" / "stamps").exists()


def test_failed_fit_leaves_no_log_folder(inputs: dict[str, str], tmp_path: Path) -> None:
    """A fit that fails once its Trainer (and logger) exist, here on data without the task, ends with its one
    error line and leaves no Lightning log folder behind (it logged nothing)."""
    root = tmp_path / "logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", "fit", f"--model.model_name_or_path={inputs['base']}", "--data.task=rte"]
        + [f"--data.data_dir={inputs['folder']}", f"--trainer.default_root_dir={root}"]
        + [f"--export.dirpath={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert proc.returncode == 2 and last.startswith("fmn-pl fit: error: data directory"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not root.exists() and not (tmp_path / "out").exists()
