"""`fmn-pl pipeline`: the whole line on a tiny random model and synthetic GLUE data (configs/pipeline/tiny.yaml),
resume (nothing recomputed; a changed merge option recomputes that merge and the report only; an interrupted
stage is redone), the dry run of the paper's config, option errors, ranks under an external launcher, and a
fine-tuning stage under DDP with two CPU processes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from fmn_pl import pipeline, pipeline_config, stages
from fmn_pl.artifacts import load_artifact
from fmn_pl.checkpoint import read_metadata, weights_fingerprint
from fmn_pl.merge_report import MergeReport
from fmn_pl.pipeline_results import PipelineReport

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pipeline"
TINY = CONFIGS / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:.*Checkpoint directory.*")


def run(config: Path, out: Path, base: Path, data: Path, *extra: str) -> dict[str, str]:
    return pipeline.main(["--config", str(config), f"--model={base}", f"--data_dir={data}", f"--output={out}", *extra])


def mtimes(folder: Path) -> dict[str, int]:
    """Modification times of the outputs (not logs, stamps, the resolved config or the merges' score cache)."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file()
        and "logs" not in p.parts
        and "stamps" not in p.parts
        and p.name not in ("pipeline.yaml", "fmn_pl_eval.json")
    }


def with_scaling(tmp_path: Path, scaling: float) -> Path:
    """tiny.yaml with another task_arithmetic scaling."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["methods"][1]["options"]["scaling"] = scaling
    path = tmp_path / f"tiny-{scaling}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_end_to_end_then_resume(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, out = tiny_base("bert"), tmp_path / "run"
    status = run(TINY, out, base, tiny_glue)
    stages = [
        "fit/rte",
        "fit/mrpc",
        "fisher/rte/mask_fisher",
        "fisher/mrpc/mask_fisher",
        "merge/rte+mrpc/fmn",
        "merge/rte+mrpc/task_arithmetic",
        "report",
    ]
    assert status == {s: "ran" for s in stages}

    # Every stage's output: checkpoints, artifacts tied to them, merges, the combined report.
    for task in ("rte", "mrpc"):
        ckpt = out / "checkpoints" / task
        meta = read_metadata(ckpt)
        assert meta["task"] == task and meta["num_train_examples"] == 48  # 64 rows, 16 held out
        art = load_artifact(ckpt, "mask_fisher")
        assert art.metadata["fingerprint"] == weights_fingerprint(ckpt) and art.metadata["num_examples"] == 32
    report = PipelineReport.read(out / "report.json")
    assert json.dumps(report.to_dict(), indent=2) + "\n" == (out / "report.json").read_text()  # read as written
    assert report.labels == ["average", "fmn", "task_arithmetic"]
    index = report.index()
    for label in ("fmn", "task_arithmetic"):  # the combined table repeats each merge's own report
        own = MergeReport.read(out / "merges" / "rte+mrpc" / label)
        assert label == "fmn" or own.options["scaling"] == 0.5
        for task, r in own.results.items():
            row, ind = index[("rte+mrpc", task, label)], index[("rte+mrpc", task, "individual")]
            assert row.score == r.score("merged") and row.normalized == r.normalized
            assert ind.score == r.score("individual")
        norm = [r.normalized for r in own.results.values() if r.normalized is not None]
        assert report.summary["rte+mrpc"][label].normalized == pytest.approx(sum(norm) / len(norm))
    assert set(report.cost_s) == {"fit", "fisher", "merge"} and all(v > 0 for v in report.cost_s.values())
    assert [c.stage for c in report.stages] == stages[:-1] and all(c.wall_s for c in report.stages)
    md = (out / "report.md").read_text()
    assert "rte 48 training examples (capped at 64), 1 epoch(s)" in md and "at most 32 validation examples" in md
    assert "mask_fisher on 32 training examples per task" in md
    for png in ("normalized.png", "scores-rte+mrpc.png", "cost.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert yaml.safe_load((out / "pipeline.yaml").read_text())["tasks"] == ["rte", "mrpc"]
    assert "| constant | individual |" in md.replace("| tasks | task | metrics ", "")

    # the run's results bundle and the evidence regenerated from it alone (tests/test_evidence.py checks both)
    assert (out / "bundle" / "rows.parquet").is_file() and "## Every method" in (out / "results.md").read_text()

    # A second run computes nothing and touches no output.
    before = mtimes(out)
    capsys.readouterr()
    assert set(run(TINY, out, base, tiny_glue).values()) == {"skipped"}
    assert mtimes(out) == before
    assert "0 stage(s) ran, 7 up to date" in capsys.readouterr().out

    # A changed merge option recomputes that merge and the report, nothing else.
    status = run(with_scaling(tmp_path, 0.3), out, base, tiny_glue)
    assert {s for s, v in status.items() if v == "ran"} == {"merge/rte+mrpc/task_arithmetic", "report"}
    own = json.loads((out / "merges" / "rte+mrpc" / "task_arithmetic" / "report.json").read_text())
    assert own["options"]["scaling"] == 0.3
    after = mtimes(out)
    assert {k for k in after if after[k] != before.get(k)} <= {
        k
        for k in after
        if k.startswith(
            ("merges/rte+mrpc/task_arithmetic", "configs/merge-rte+mrpc-task_arithmetic", "report", "plots", "bundle")
        )
        or k == "results.md"
    }

    # A method whose defaults changed (a new fmn-pl) recomputes its merges: the key holds the resolved options.
    from fmn_pl.merging.fmn import FMN

    options = FMN.options
    monkeypatch.setattr(FMN, "options", lambda self: {**options(self), "power": 0.5})
    assert (
        pipeline.main(
            [
                "--config",
                str(with_scaling(tmp_path, 0.3)),
                f"--model={base}",
                f"--data_dir={tiny_glue}",
                f"--output={out}",
                "--dry_run=true",
            ]
        )
        == []
    )
    assert "merge/rte+mrpc/fmn: would run (options changed)" in capsys.readouterr().out
    monkeypatch.undo()

    # --rerun forces a stage; what reads its output follows (the artifact records its compute time, so its
    # bytes change), what does not read it stays.
    status = run(with_scaling(tmp_path, 0.3), out, base, tiny_glue, "--rerun=fisher/rte")
    assert {s for s, v in status.items() if v == "ran"} == {"fisher/rte/mask_fisher", "merge/rte+mrpc/fmn", "report"}


def test_interrupted_stage_is_redone(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path, monkeypatch
) -> None:
    """A stage killed after writing its output but before its stamp is not taken for finished."""
    base, out = tiny_base("bert"), tmp_path / "run"
    real = pipeline.run_stage

    def killed(stage, cfg, log, **kw):
        real(stage, cfg, log, **kw)
        if stage.id == "merge/rte+mrpc/fmn":
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        run(TINY, out, base, tiny_glue)
    assert (out / "merges" / "rte+mrpc" / "fmn" / "report.json").is_file()
    assert not stages.stamp_path(
        pipeline_config.parse_config(["--config", str(TINY), f"--output={out}"])[0],
        stages.Stage("merge/rte+mrpc/fmn", "merge", [], {}, [], None, out),
    ).exists()
    monkeypatch.setattr(pipeline, "run_stage", real)
    status = run(TINY, out, base, tiny_glue)
    assert status["merge/rte+mrpc/fmn"] == "ran" and status["fit/rte"] == status["fisher/mrpc/mask_fisher"] == "skipped"
    assert status["merge/rte+mrpc/task_arithmetic"] == "ran"  # never reached before the interruption


def test_stage_that_wrote_nothing_is_never_stamped(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path, monkeypatch, capsys
) -> None:
    """A stage that returns without writing (as Lightning's SIGTERM exit 0 once did) leaves the old artifact, which
    the pipeline refuses to stamp: the stage fails and stays unstamped."""
    base, out = tiny_base("bert"), tmp_path / "run"
    run(TINY, out, base, tiny_glue, "--only=fit/rte,fisher/rte")
    artifact = out / "checkpoints" / "rte" / "mask_fisher.safetensors"
    os.utime(artifact, (time.time() - 10, time.time() - 10))  # written well before the rerun
    real = pipeline.run_stage
    monkeypatch.setattr(
        pipeline, "run_stage", lambda stage, *a, **kw: None if stage.kind == "fisher" else real(stage, *a, **kw)
    )
    with pytest.raises(SystemExit):
        run(TINY, out, base, tiny_glue, "--only=fisher/rte", "--rerun=fisher/rte")
    assert "ended without writing" in capsys.readouterr().err
    cfg = pipeline_config.parse_config(["--config", str(TINY), f"--output={out}"])[0]
    assert not stages.stamp_path(cfg, stages.Stage("fisher/rte/mask_fisher", "fisher", [], {}, [], None, out)).exists()


def test_only_needs_finished_inputs(tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path, capsys) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(TINY, out, tiny_base("bert"), tiny_glue, "--only=fisher")
    assert e.value.code == 1
    assert "error: fit/rte is needed by the selected stages but it is not finished" in capsys.readouterr().err
    with pytest.raises(ValueError, match="matches no stage"):
        run(TINY, out, tiny_base("bert"), tiny_glue, "--only=fit/cola")
    assert run(TINY, out, tiny_base("bert"), tiny_glue, "--only=fit/rte") == {"fit/rte": "ran"}


def test_dry_run_of_the_paper_config(capsys) -> None:
    """paper.yaml (bert-base-uncased and GLUE from the hub, 7 tasks, 21 pairs) validates without computing."""
    assert pipeline.main(["--config", str(CONFIGS / "paper.yaml"), "--dry_run=true"]) == []
    out = capsys.readouterr().out
    cfg = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    n_methods, n_kinds = len(cfg["merge"]["methods"]), 3
    assert f"dry run: {7 + 7 * n_kinds + 21 * n_methods + 1} stages" in out and "0 problem(s)" in out
    assert "merge/mrpc+rte/fmn_reference: would run" in out
    assert '# {"method":"fmn","normalize":"none","broadcast":"reference","power":1.0,"scaling":1.0}' in out
    assert not Path("runs/paper").exists() or not any(Path("runs/paper").iterdir())


def test_dry_run_reports_problems(tmp_path: Path, capsys) -> None:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["methods"][0]["options"] = {"coefficients": "both"}  # built, but not a list: the parser says so
    cfg["fit"]["per_task"] = {"rte": {"learning_rate": "fast"}}  # per-task overrides are typed by the fit parser
    cfg["data_dir"] = str(tmp_path / "nowhere")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(path), f"--output={tmp_path / 'out'}", "--dry_run=true"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "problem: merge/rte+mrpc/fmn: its arguments do not parse" in out and "coefficients" in out
    assert "problem: fit/rte: its arguments do not parse" in out and "learning_rate" in out
    assert f"problem: data of rte: folder {tmp_path / 'nowhere'} does not exist" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, error",
    [
        ({"tasks": ["rte", "RTE"]}, "lists a task twice"),
        ({"merge": {"methods": [{"name": "fmn"}, {"name": "fmn"}]}}, "appear twice; give each a distinct `label`"),
        ({"merge": {"methods": [{"name": "magic"}]}}, "unknown merge method 'magic'"),
        ({"merge": {"methods": [{"name": "fmn", "options": {"broadcas": "x"}}]}}, "merge.methods: fmn: .*'broadcas'"),
        ({"merge": {"combinations": [["rte", "cola"]]}}, r"names \['cola'\], not in tasks"),
        (
            {"fit": {"per_task": {"rte": {"learning_rat": 1.0}}}},
            r"fit.per_task.rte: unknown option\(s\) \['learning_rat'\]",
        ),
        ({"fisher": {"kinds": ["grams"]}}, r"lacks \['mask_fisher'\], which merge.methods need"),
    ],
)
def test_option_errors(tmp_path: Path, change: dict, error: str) -> None:
    cfg = yaml.safe_load(TINY.read_text())
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=error):
        stages.plan(pipeline_config.parse_config(["--config", str(path)])[0])


def test_other_ranks_leave_single_process_stages_to_rank_zero(tmp_path: Path, monkeypatch) -> None:
    """Under torchrun/srun (one pipeline per rank), a rank other than 0 runs only the stages that need a
    launcher; here there are none, so it runs nothing and writes nothing."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg, _ = pipeline_config.parse_config(["--config", str(TINY), f"--output={tmp_path / 'out'}"])
    monkeypatch.setattr(pipeline, "run_stage", lambda *a, **k: pytest.fail("rank 1 ran a single-process stage"))
    status = pipeline.execute(cfg)
    assert set(status.values()) == {"rank 0"} and len(status) == 7
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ddp_stage_with_two_cpu_processes(tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path) -> None:
    """A fine-tuning stage with devices 2 and strategy ddp runs as its own `python -m fmn_pl.cli fit` process,
    whose Lightning launcher starts the second rank (gloo on CPU); rank 0 exports, the pipeline stamps."""
    out = tmp_path / "run"
    status = run(
        TINY,
        out,
        tiny_base("bert"),
        tiny_glue,
        "--only=fit/rte",
        "--fit.launch.accelerator=cpu",
        "--fit.launch.devices=2",
        "--fit.launch.strategy=ddp",
    )
    assert status == {"fit/rte": "ran"}
    log = (out / "logs" / "fit__rte.log").read_text()
    assert log.splitlines()[0] == f"$ fmn-pl fit --config {out / 'configs' / 'fit-rte.yaml'}" and "MEMBER: 2/2" in log
    assert yaml.safe_load((out / "configs" / "fit-rte.yaml").read_text())["trainer"]["devices"] == 2
    assert read_metadata(out / "checkpoints" / "rte")["task"] == "rte"
    stamp = json.loads((out / "stamps" / "fit__rte.json").read_text())
    assert stamp["launch"]["devices"] == 2 and stamp["launch"]["strategy"] == "ddp"


@pytest.mark.slow
def test_under_torchrun_two_ranks(tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path) -> None:
    """examples/torchrun.sh with 2 CPU ranks: one pipeline per rank; two consecutive DDP stages (each with a
    store of its own: torchrun's shared one would hand the second stage the first one's dead addresses); rank 1
    waits for rank 0's stamp between them; rank 0 alone stamps."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    script = Path(__file__).resolve().parents[1] / "examples" / "torchrun.sh"
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        proc = subprocess.run(
            [
                "bash",
                str(script),
                str(TINY),
                "2",
                f"--model={tiny_base('bert')}",
                f"--data_dir={tiny_glue}",
                f"--output={out}",
                "--trainer.accelerator=cpu",
                "--only=fit/rte,fisher/rte/mask_fisher",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        rank1 = out / "logs" / "fit__rte.rank1.log"
        # Seen once on an oversubscribed 2-core machine: rank 1's gloo process aborted ("terminate called without
        # an active exception") during the fit; a second try passed. Retry that one failure once, nothing else.
        if proc.returncode == 0 or not (rank1.is_file() and "without an active exception" in rank1.read_text()):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipeline: 2 stage(s) ran" in proc.stdout
    for stage in ("fit__rte", "fisher__rte__mask_fisher"):
        assert "MEMBER: 1/2" in (out / "logs" / f"{stage}.log").read_text()
        assert "MEMBER: 2/2" in (out / "logs" / f"{stage}.rank1.log").read_text()
        assert json.loads((out / "stamps" / f"{stage}.json").read_text())["launch"]["devices"] == 2
    art = load_artifact(out / "checkpoints" / "rte", "mask_fisher")
    assert art.metadata["world_size"] == 2 and art.metadata["num_examples"] == 32


def test_method_option_null_reaches_the_merge(tmp_path: Path) -> None:
    """`options: {scaling: null}` means "choose it": it must reach the stage as null, not be dropped for the
    method's default (TIES' is 1.0); other None options still leave the stage's default."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["methods"] = [{"name": "ties", "options": {"scaling": None}}]
    cfg["model"], cfg["output"] = "some/base", str(tmp_path / "run")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    plan = stages.plan(pipeline_config.parse_config(["--config", str(tmp_path / "p.yaml")])[0])
    merge = next(s for s in plan if s.kind == "merge")
    assert merge.config.method.scaling is None and merge.options["method"]["init_args"]["scaling"] is None
    assert merge.config.base == "some/base"  # ties needs the pretrained model
