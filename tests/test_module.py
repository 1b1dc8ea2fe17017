"""`fmn-pl fit/validate/test` end to end on tiny random models: the loss goes down for every family, the
export reloads with identical logits, and every bad input stops with one line before anything is written."""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fmn_pl.checkpoint import CheckpointMeta, export_checkpoint, read_metadata, weights_fingerprint
from fmn_pl.cli import main
from fmn_pl.fit import lightning_cli
from fmn_pl.module import GLUETransformer, load_model, model_inputs
from fmn_pl.tasks import get_task
from tests.conftest import make_sentence, tiny_config

FIT_FAMILIES = ("bert", "roberta", "distilbert", "electra")
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv is in sys.argv


def learnable_rows(task: str, n: int, seed: int) -> dict[str, list]:
    """Rows whose label follows a word rule (so a tiny model can learn it): 'good'/'not' decide."""
    rng = random.Random(seed)
    spec = get_task(task)
    rows: dict[str, list] = {k: [] for k in (*spec.text_keys, "label")}
    for i in range(n):
        y = i % 2
        cue = "good" if y else "bad"
        texts = [make_sentence(rng, rng.randint(2, 8)) for _ in spec.text_keys]
        texts[-1] = f"{cue} {texts[-1]} {cue}"
        for k, t in zip(spec.text_keys, texts):
            rows[k].append(t)
        rows["label"].append(float(1 + 3 * y) if spec.is_regression else y)
    return rows


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """A small learnable GLUE folder (parquet layout) for rte, sst2, stsb and mnli."""
    root = tmp_path_factory.mktemp("learnable_glue")
    for task in ("rte", "sst2", "stsb", "mnli"):
        spec = get_task(task)
        (root / task).mkdir()
        for n, (split, size) in enumerate((("train", 48), *((s, 24) for s in spec.eval_splits))):
            rows = learnable_rows(task, size, seed=n)
            if spec.is_regression:
                rows["label"] = pa.array(rows["label"], pa.float32())
            pq.write_table(pa.table(rows), root / task / f"{split}.parquet")
    return root


def fit_args(base: Path, data: Path, out: Path, task: str = "rte", epochs: int = 8, *extra: str) -> list[str]:
    return [
        "fit",
        f"--model.model_name_or_path={base}",
        f"--data.task={task}",
        f"--data.data_dir={data}",
        "--data.batch_size=8",
        "--data.max_train_samples=32",
        "--model.learning_rate=1e-2",
        "--model.warmup_ratio=0",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        f"--export.dirpath={out / 'export'}",
        "--seed_everything=7",
        *extra,
    ]


def read_csv_log(out: Path) -> list[dict[str, str]]:
    (path,) = (out / "logs").rglob("metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def epoch_means(rows: list[dict[str, str]], key: str) -> list[float]:
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        if r.get(key):
            by_epoch.setdefault(int(r["epoch"]), []).append(float(r[key]))
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def no_debris(folder: Path) -> list[str]:
    """Temporary or half-written exports left anywhere under `folder`."""
    return [str(p) for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def first_batch(dm) -> dict[str, torch.Tensor]:
    loader = dm.val_dataloader()
    return next(iter(loader[0] if isinstance(loader, list) else loader))


def test_export_monitor_picks_the_epoch_on_holdout(tiny_base, glue_dir, tmp_path, monkeypatch):
    """`export.monitor: val_holdout/score` with eval splits holdout and validation: the exported epoch is the
    best on the held-out rows, whatever validation says; a monitor that is not logged is refused by name."""
    monkeypatch.chdir(tmp_path)
    extra = [
        "--data.holdout_samples=16",
        "--data.eval_splits=[holdout, validation]",
        "--export.monitor=val_holdout/score",
    ]
    lightning_cli(fit_args(tiny_base("bert"), glue_dir, tmp_path, "rte", 4, *extra))
    holdout = epoch_means(read_csv_log(tmp_path), "val_holdout/score")
    meta = read_metadata(tmp_path / "export")
    assert len(holdout) == 4 and meta["epoch"] == holdout.index(max(holdout))
    assert (
        meta["metrics"]["val_holdout/score"] == pytest.approx(max(holdout))
        and "val_validation/score" in meta["metrics"]
    )
    with pytest.raises(
        ValueError, match=r"export.monitor 'val/acc' is not a logged validation metric; logged: .*val/score"
    ):
        lightning_cli(fit_args(tiny_base("bert"), glue_dir, tmp_path / "b", "rte", 1, "--export.monitor=val/acc"))


def test_export_keeps_the_best_epoch_of_the_monitored_metric():
    """The kept epoch follows `monitor`, not `val/score`: here they peak at different epochs."""
    from types import SimpleNamespace

    from fmn_pl.fit import ExportCheckpoint

    module = SimpleNamespace(model=torch.nn.Linear(1, 1))
    for monitor, best in (("val_holdout/score", 2), ("val/score", 1)):
        cb = ExportCheckpoint(dirpath="unused", monitor=monitor)
        for epoch, (both, held) in enumerate([(0.5, 0.5), (0.9, 0.4), (0.6, 0.7), (0.7, 0.6)]):
            trainer = SimpleNamespace(
                sanity_checking=False,
                state=SimpleNamespace(fn="fit"),
                current_epoch=epoch,
                callback_metrics={"val/score": torch.tensor(both), "val_holdout/score": torch.tensor(held)},
            )
            cb.on_validation_end(trainer, module)
        assert cb.best_epoch == best, monitor


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    """A process killed by SIGTERM (a cluster's time limit) inside `atomic_dir` exits 143 and leaves neither the
    target nor its temporary folder; outside the block the previous SIGTERM handler is back."""
    import signal
    import subprocess

    from fmn_pl.files import atomic_dir

    script = (
        "import os, signal, sys, time\nfrom fmn_pl.files import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'half.bin').write_bytes(b'x')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=repo, timeout=60)
    assert proc.returncode == 143 and list(tmp_path.iterdir()) == []
    before = signal.getsignal(signal.SIGTERM)
    with atomic_dir(tmp_path / "ok") as tmp:
        (tmp / "f").write_text("done")
    assert signal.getsignal(signal.SIGTERM) is before and (tmp_path / "ok" / "f").read_text() == "done"


# -- fit, export, reload --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FIT_FAMILIES)
def test_fit_lowers_loss_exports_and_reloads(family, tiny_base, glue_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tiny_base(family)
    cli = lightning_cli(fit_args(base, glue_dir, tmp_path))
    log = read_csv_log(tmp_path)
    losses = epoch_means(log, "train/loss")
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses
    scores = epoch_means(log, "val/score")
    assert len(scores) == 8 and max(scores) >= 0.75, scores

    export = tmp_path / "export"
    meta = read_metadata(export)
    for key in (
        "task",
        "label_names",
        "num_labels",
        "base_model",
        "metrics",
        "seed",
        "num_train_examples",
        "fingerprint",
        "epoch",
    ):
        assert key in meta, key
    assert meta["task"] == "rte" and meta["label_names"] == ["entailment", "not_entailment"]
    assert meta["base_model"] == str(base) and meta["seed"] == 7 and meta["num_train_examples"] == 32
    assert meta["fingerprint"] == weights_fingerprint(export)
    assert meta["metrics"]["val/score"] == pytest.approx(max(scores))  # the best epoch is the one exported
    assert meta["epoch"] == scores.index(max(scores))
    assert not any(k.startswith("_") for k in meta["data"]) and meta["data"]["max_train_samples"] == 32
    resolved = (export / "config.yaml").read_text()
    assert f"model_name_or_path: {base}" in resolved and "task: rte" in resolved
    assert no_debris(tmp_path) == []

    # the folder loads as is, model and tokenizer, with the task's labels and identical logits
    reloaded = AutoModelForSequenceClassification.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert reloaded.config.id2label == {0: "entailment", 1: "not_entailment"}
    batch = first_batch(cli.datamodule)
    with torch.no_grad():
        expected = cli.model.model.eval()(**model_inputs(batch)).logits
        got = reloaded(**model_inputs(batch)).logits
    assert torch.equal(got, expected)
    text = "the good movie"
    assert tokenizer(text)["input_ids"] == cli.datamodule.tokenizer(text)["input_ids"]

    # `validate` on the export reproduces the recorded (best epoch's) metrics, not the last epoch's
    val = lightning_cli(
        [
            "validate",
            f"--model.model_name_or_path={export}",
            "--data.task=rte",
            f"--data.data_dir={glue_dir}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'val'}",
        ]
    )
    assert float(val.trainer.callback_metrics["val/score"]) == pytest.approx(meta["metrics"]["val/score"])


def test_regression_stsb(tiny_base, glue_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(fit_args(tiny_base("bert"), glue_dir, tmp_path, "stsb", 6))
    log = read_csv_log(tmp_path)
    losses = epoch_means(log, "train/loss")
    assert losses[-1] < 0.5 * losses[0], losses  # MSE on scores 1 and 4
    assert {"val/pearson", "val/spearman", "val/score"} <= set(log[0])
    assert cli.model.model.config.problem_type == "regression" and cli.model.model.config.num_labels == 1
    batch = first_batch(cli.datamodule)
    assert batch["labels"].dtype == torch.float32
    with torch.no_grad():
        pred = cli.model.model.eval()(**model_inputs(batch)).logits.squeeze(-1)
        manual = torch.nn.functional.mse_loss(pred, batch["labels"])
        assert float(cli.model.loss(pred.unsqueeze(-1), batch["labels"])) == pytest.approx(float(manual))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    assert reloaded.config.num_labels == 1 and read_metadata(tmp_path / "export")["label_names"] == []


def test_validate_and_test_subcommands_mnli(make_checkpoint, glue_dir, tmp_path, monkeypatch):
    """An exported checkpoint validates and tests; MNLI reports matched, mismatched and their mean."""
    monkeypatch.chdir(tmp_path)
    ckpt = make_checkpoint("mnli")
    args = [
        f"--model.model_name_or_path={ckpt}",
        "--data.task=mnli",
        f"--data.data_dir={glue_dir}",
        "--data.max_eval_samples=16",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    for stage in ("validate", "test"):
        cli = lightning_cli([stage, *args])
        m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        prefix = "val" if stage == "validate" else "test"
        assert {f"{prefix}_matched/accuracy", f"{prefix}_mismatched/accuracy", f"{prefix}/score"} <= set(m)
        assert m[f"{prefix}/score"] == pytest.approx(
            (m[f"{prefix}_matched/accuracy"] + m[f"{prefix}_mismatched/accuracy"]) / 2
        )
        # the accuracy on the matched split, by hand
        dm = cli.datamodule
        correct = total = 0
        with torch.no_grad():
            for batch in dm.val_dataloader()[0]:
                correct += int((model(**model_inputs(batch)).logits.argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
        assert total == 16 and m[f"{prefix}_matched/accuracy"] == pytest.approx(correct / total)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--data.max_train_samples",
        "--data.group_by_length",
        "--model.model_name_or_path",
        "--export.dirpath",
        "--export.overwrite",
        "cap on training examples",
    ):
        assert option in text, option
    main(["--help"])
    text = capsys.readouterr().out
    assert all(word in text for word in ("fit", "validate", "test", "fisher", "merge", "pipeline"))


def test_print_config_resolves_links(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.model_name_or_path=some/model", "--data.task=cola", "--print_config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "task: cola" in text and "model_name_or_path: some/model" in text and "max_train_samples: null" in text


# -- bad input: one line, naming the offender, nothing written -------------------------------------------
def expect_error(args: list[str], error: type, *fragments: str, out: Path) -> str:
    with pytest.raises(error) as e:
        lightning_cli(args)
    text = str(e.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert not (out / "export").exists() and no_debris(out) == []
    return text


@pytest.fixture
def setup_bad(tiny_base, glue_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_base("bert"), glue_dir, tmp_path


def test_bad_unknown_task(setup_bad):
    base, data, out = setup_bad
    expect_error(fit_args(base, data, out, "wnli", 1), ValueError, "unknown GLUE task 'wnli'", "rte", out=out)


def test_bad_data_dir_without_task(setup_bad, tmp_path):
    base, _, out = setup_bad
    (tmp_path / "empty").mkdir()
    expect_error(
        fit_args(base, tmp_path / "empty", out, "rte", 1),
        FileNotFoundError,
        f"data directory {tmp_path / 'empty'} has neither rte/",
        "RTE/",
        out=out,
    )


def test_bad_missing_split(setup_bad, tmp_path):
    base, data, out = setup_bad
    (tmp_path / "d" / "rte").mkdir(parents=True)
    (tmp_path / "d" / "rte" / "train.parquet").write_bytes((data / "rte" / "train.parquet").read_bytes())
    expect_error(
        fit_args(base, tmp_path / "d", out, "rte", 1),
        FileNotFoundError,
        str(tmp_path / "d" / "rte" / "validation.parquet"),
        out=out,
    )


def test_bad_missing_column(setup_bad, tmp_path):
    base, _, out = setup_bad
    (tmp_path / "d" / "rte").mkdir(parents=True)
    for split in ("train", "validation"):
        pq.write_table(pa.table({"sentence1": ["a b"], "label": [0]}), tmp_path / "d" / "rte" / f"{split}.parquet")
    expect_error(
        fit_args(base, tmp_path / "d", out, "rte", 1),
        ValueError,
        "train.parquet lacks column(s) ['sentence2']",
        out=out,
    )


def test_bad_labels_out_of_range(setup_bad, tmp_path):
    base, _, out = setup_bad
    (tmp_path / "d" / "sst2").mkdir(parents=True)
    for split in ("train", "validation"):
        pq.write_table(
            pa.table({"sentence": ["a b", "c d"], "label": [1, 2]}), tmp_path / "d" / "sst2" / f"{split}.parquet"
        )
    expect_error(
        fit_args(base, tmp_path / "d", out, "sst2", 1),
        ValueError,
        "train.parquet: row 1: label 2 is outside 0..1",
        out=out,
    )


def test_bad_model_path_missing(setup_bad):
    base, data, out = setup_bad
    expect_error(
        fit_args(out / "no-such-model", data, out, "rte", 1),
        FileNotFoundError,
        f"model {out / 'no-such-model'} does not exist",
        out=out,
    )


def test_bad_model_folder_without_config(setup_bad, tmp_path):
    _, data, out = setup_bad
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.txt").write_text("x")
    expect_error(
        fit_args(tmp_path / "notamodel", data, out, "rte", 1),
        ValueError,
        f"model folder {tmp_path / 'notamodel'} has no config.json",
        out=out,
    )


def test_bad_model_without_sequence_classification(setup_bad, tmp_path):
    from transformers import AutoConfig

    _, data, out = setup_bad
    AutoConfig.for_model(
        "vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    ).save_pretrained(tmp_path / "vit")
    expect_error(
        fit_args(tmp_path / "vit", data, out, "rte", 1),
        ValueError,
        "(vit) has no sequence-classification model",
        out=out,
    )


def test_bad_num_labels(setup_bad):
    base, data, out = setup_bad
    expect_error(
        fit_args(base, data, out, "rte", 1, "--model.num_labels=3"),
        ValueError,
        "num_labels=3 disagrees with task 'rte', which has 2",
        out=out,
    )


def test_bad_trained_head_of_another_size(setup_bad, make_checkpoint):
    _, data, out = setup_bad
    stsb = make_checkpoint("stsb")
    expect_error(
        fit_args(stsb, data, out, "rte", 1), ValueError, "1-label classifier head but task 'rte' needs 2", out=out
    )


def test_export_folder_of_another_task_is_refused_before_training(setup_bad, make_checkpoint):
    base, data, out = setup_bad
    other = make_checkpoint("stsb", name="occupied")
    before = weights_fingerprint(other)
    args = fit_args(base, data, out, "rte", 1)
    args[args.index(f"--export.dirpath={out / 'export'}")] = f"--export.dirpath={other}"
    with pytest.raises(FileExistsError) as e:
        lightning_cli(args)
    assert (
        str(e.value)
        == f"{other} already holds an export of task 'stsb'; refusing to write task 'rte' there without overwrite"
    )
    assert weights_fingerprint(other) == before and read_metadata(other)["task"] == "stsb"
    assert not list((out / "logs").rglob("metrics.csv"))  # refused before any training step or log
    assert no_debris(out) == []
    lightning_cli([*args, "--export.overwrite=true"])
    assert read_metadata(other)["task"] == "rte" and no_debris(out) == []


def test_export_folder_with_other_files_is_refused(setup_bad):
    base, data, out = setup_bad
    (out / "export").mkdir()
    (out / "export" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files that are not an fmn-pl export"):
        lightning_cli(fit_args(base, data, out, "rte", 1))
    assert [p.name for p in (out / "export").iterdir()] == ["notes.txt"]


def test_same_task_export_is_replaced(setup_bad):
    base, data, out = setup_bad
    lightning_cli(fit_args(base, data, out, "rte", 1))
    first = weights_fingerprint(out / "export")
    lightning_cli(fit_args(base, data, out, "rte", 2))
    assert weights_fingerprint(out / "export") != first and read_metadata(out / "export")["epochs_trained"] == 2
    assert no_debris(out) == []


def test_failed_export_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    spec = get_task("rte")
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert"))
    meta = CheckpointMeta(task="rte", label_names=list(spec.label_names), base_model="x")
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(model, BrokenTokenizer(), tmp_path / "export", meta)
    assert list(tmp_path.iterdir()) == []


def test_shell_errors_are_one_line(setup_bad, capsys, monkeypatch):
    """From the shell (`fmn-pl fit ...`), bad input prints `fmn-pl fit: error: ...` and exits 2, no traceback."""
    base, data, out = setup_bad
    monkeypatch.delenv("FMN_PL_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["fmn-pl", *fit_args(base, data, out, "qqq", 1)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fmn-pl fit: error: unknown GLUE task 'qqq'") and "Traceback" not in "\n".join(err)


def test_module_direct(tiny_base):
    """The module on its own: task from the name, train mode after loading, weight decay groups."""
    module = GLUETransformer(str(tiny_base("electra")), task="QNLI")
    assert module.task.name == "qnli" and module.model.training
    assert module.model.config.label2id == {"entailment": 0, "not_entailment": 1}
    model = load_model(str(tiny_base("electra")), get_task("stsb"))
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
