"""Time to read and tokenize the demo's data, and how often the demo tokenizes each row set, as JSON.

    python benchmarks/data_loading.py                    # load/tokenize time: a fresh data module, then a second
    python benchmarks/data_loading.py --count_pipeline --fit_batches 2  # also: the demo's stages on a tiny model

Timing: per task of configs/pipeline/demo.yaml, the fit stage's `GLUEDataModule` (capped train rows, the held-out
rows, the validation split) is set up once in an empty `HF_DATASETS_CACHE` (a fresh data module) and once more
(a second data module over the same rows, as a later stage builds it). Counting: the demo's pipeline runs on a
tiny random model with the demo model's tokenizer (so rows and lengths are the demo's) and every
`GLUEDataModule.load` is recorded with whether the tokenizer ran: `loads` per row set is how often the demo
reads it, `tokenized` how often it tokenized it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def demo_config(path: Path) -> dict[str, Any]:
    """The pipeline config, its relative paths taken from the repository root."""
    cfg = yaml.safe_load(path.read_text())
    for key in ("model", "data_dir"):
        if not Path(cfg[key]).is_absolute():
            cfg[key] = str((ROOT / cfg[key]).resolve())
    return cfg


def fit_data_options(cfg: dict[str, Any], task: str) -> dict[str, Any]:
    """The data options of the demo's fit stage for `task` (per-task overrides applied)."""
    fit = {**cfg["fit"], **cfg["fit"].get("per_task", {}).get(task, {})}
    return {
        "task": task,
        "data_dir": cfg["data_dir"],
        "tokenizer": cfg["model"],
        "max_length": fit.get("max_length"),
        "max_train_samples": fit.get("max_train_samples"),
        "holdout_samples": fit.get("holdout_samples", 0),
        "sample_seed": fit.get("seed", 0),
        "eval_splits": ["holdout", "validation"],
    }


def timing(cfg: dict[str, Any]) -> dict[str, Any]:
    """Seconds to set up every task's fit data module: first (empty cache), then a second one (same rows)."""
    from fmn_pl.data import GLUEDataModule

    out: dict[str, Any] = {}
    for attempt in ("first", "second"):
        per_task = {}
        start = time.perf_counter()
        for task in cfg["tasks"]:
            t0 = time.perf_counter()
            dm = GLUEDataModule(**fit_data_options(cfg, task))
            dm.setup("fit")
            rows = {"train": len(dm.train_dataset), **{s: len(d) for s, d in dm.eval_datasets.items()}}
            per_task[task] = {"seconds": round(time.perf_counter() - t0, 3), "rows": rows}
        out[attempt] = {"seconds": round(time.perf_counter() - start, 3), "tasks": per_task}
    return out


def count_pipeline(cfg: dict[str, Any], work: Path, fit_batches: int | None) -> dict[str, Any]:
    """Run the demo's stages on a tiny model (the demo's tokenizer) and count loads and tokenizations per row set;
    `fit_batches` (training batches per epoch) shortens the fits, which read the same rows whatever their length."""
    import datasets
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

    from fmn_pl import data, pipeline

    datasets.config.HF_DATASETS_CACHE = str(work / "hf-datasets-pipeline")  # empty: the timing's cache not reused

    base = work / "tiny-base"
    config = AutoConfig.from_pretrained(cfg["model"])
    config.update({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37})
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(base)
    AutoTokenizer.from_pretrained(cfg["model"]).save_pretrained(base)

    calls = [0]
    tokenizer_call = PreTrainedTokenizerBase.__call__

    def counting_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return tokenizer_call(self, *args, **kwargs)

    loads: Counter = Counter()
    tokenized: Counter = Counter()
    load = data.GLUEDataModule.load

    def recording_load(self: Any, split: str, cap: int | None) -> Any:
        before = calls[0]
        ds = load(self, split, cap)
        key = f"{self.task.name}/{split}/{len(ds.rows)} rows/{hash(tuple(ds.rows)) & 0xFFFFFF:06x}"
        loads[key] += 1
        tokenized[key] += calls[0] > before
        print(f"data_loading: load {key}: tokenized {calls[0] > before}", file=sys.stderr, flush=True)
        return ds

    PreTrainedTokenizerBase.__call__ = counting_call  # type: ignore[method-assign]
    data.GLUEDataModule.load = recording_load  # type: ignore[method-assign]
    pipe = {k: v for k, v in cfg.items() if k not in ("model", "data_dir", "output")}
    if fit_batches:
        pipe["fit"]["args"] = {**pipe["fit"].get("args", {}), "trainer.limit_train_batches": fit_batches}
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(pipe))
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the stages' console lines: stdout keeps the JSON alone
        pipeline.main(
            ["--config", str(path), f"--model={base}", f"--data_dir={cfg['data_dir']}", f"--output={work / 'run'}"]
        )
    return {
        "pipeline_seconds": round(time.perf_counter() - start, 1),
        "row_sets": len(loads),
        "loads": sum(loads.values()),
        "tokenizations": sum(tokenized.values()),
        "per_row_set": {k: {"loads": loads[k], "tokenized": tokenized[k]} for k in sorted(loads)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pipeline/demo.yaml", help="relative to the repository root")
    parser.add_argument("--count_pipeline", action="store_true", help="also run the demo's stages on a tiny model")
    parser.add_argument("--fit_batches", type=int, default=None, help="training batches per epoch when counting")
    args = parser.parse_args(argv)
    cfg = demo_config(ROOT / args.config)
    with tempfile.TemporaryDirectory(prefix="fmn-data-bench-") as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf-datasets")  # an empty cache: the first load is cold
        result: dict[str, Any] = {
            "command": " ".join(
                ["python", "benchmarks/data_loading.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "config": str(
                Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config
            ),
            "timing": timing(cfg),
        }
        if args.count_pipeline:
            result["pipeline"] = count_pipeline(cfg, Path(tmp), args.fit_batches)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
