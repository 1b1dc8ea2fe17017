"""Why a task collapses in a merge (SST-2 with STS-B): the [CLS] and pooled representations of each task's rows
under its own model and under the merged body, which single merged group breaks the own model, and what a
re-estimated head bias or a re-standardized representation recovers. Prints one JSON document.

    python research/collapse_probe.py --checkpoints runs/reference/seed-1/checkpoints/sst2 \
        runs/reference/seed-1/checkpoints/stsb --method task_arithmetic --options '{"scaling": 1.0}'

Everything a fix estimates (bias, per-feature mean and spread) comes from the held-out training rows (`--fit_split`);
the fixes are scored on a seeded sample of the validation split (`--max_samples`, 300).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any, Iterator

import torch

from fmn_pl import Evaluator, merge_body, method_class
from fmn_pl.evaluate import EvalData
from fmn_pl.module import model_inputs


@contextlib.contextmanager
def swapped(model: torch.nn.Module, body: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """`model` with `body`'s tensors copied in for the block, its own put back after."""
    params = dict(model.named_parameters())
    own = {k: params[k].detach().clone() for k in body or {}}
    with torch.no_grad():
        for k, v in (body or {}).items():
            params[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in own.items():
                params[k].copy_(v)


@torch.no_grad()
def forward(ev: Evaluator, i: int, body: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """[CLS] hidden state, pooled output, logits and labels of task i's rows under `body` (None: its own)."""
    model, dm = ev.model(i), ev.datamodule(i)
    got: dict[str, list[torch.Tensor]] = {"cls": [], "pooled": [], "logits": [], "labels": []}

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        got["cls"].append(args[0][:, 0].clone())
        got["pooled"].append(out.clone())

    handle = model.base_model.pooler.register_forward_hook(hook)
    try:
        with swapped(model, body):
            for split in dm.eval_splits:
                for batch in dm.eval_dataloader(split):
                    got["logits"].append(model(**model_inputs(batch)).logits.float())
                    got["labels"].append(batch["labels"].float())
    finally:
        handle.remove()
    return {k: torch.cat(v).double() for k, v in got.items()}


def score(out: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and positive share (two classes from a margin), or Pearson/Spearman/MSE (one output)."""
    if out.dim() == 2:  # two-class logits
        pred = (out[:, 1] > out[:, 0]).double()
        return {"accuracy": 100 * float((pred == labels).double().mean()), "positive": float(pred.mean())}
    from scipy.stats import spearmanr

    pearson = float(torch.corrcoef(torch.stack([out, labels]))[0, 1])
    spear = float(spearmanr(out.numpy(), labels.numpy()).statistic)
    return {
        "score": 50 * (pearson + spear),
        "mse": float(((out - labels) ** 2).mean()),
        "mean": float(out.mean()),
        "std": float(out.std()),
    }


def auc(margin: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of a margin: how well it orders the classes, whatever its threshold."""
    pos, neg = margin[labels == 1], margin[labels == 0]
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def representation(own: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How the merged [CLS] and pooled vectors differ from the own model's: scale, mean shift, per-row cosine."""
    out = {}
    for name in ("cls", "pooled"):
        a, b = own[name], merged[name]
        out[name] = {
            "row_norm_own": float(a.norm(dim=1).mean()),
            "row_norm_merged": float(b.norm(dim=1).mean()),
            "mean_norm_own": float(a.mean(0).norm()),
            "mean_norm_merged": float(b.mean(0).norm()),
            "spread_own": float((a - a.mean(0)).norm(dim=1).mean()),
            "spread_merged": float((b - b.mean(0)).norm(dim=1).mean()),
            "row_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()),
            "mean_cosine": float(torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0)),
        }
    out["pooled"]["saturated_own"] = float((own["pooled"].abs() > 0.99).double().mean())
    out["pooled"]["saturated_merged"] = float((merged["pooled"].abs() > 0.99).double().mean())
    return out


def fixes(
    head: tuple[torch.Tensor, torch.Tensor],
    pooler: tuple[torch.Tensor, torch.Tensor],
    hold: dict[str, dict[str, torch.Tensor]],
    val: dict[str, dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """Validation scores of the merged model as is and with each fix estimated on the held-out rows: the head's
    bias re-estimated on labels (`bias`), the pooled vector's per-feature mean (`pooled_mean`) or mean and
    spread (`pooled_standardize`) or the [CLS] vector's (`cls_standardize`) moved to the own model's."""
    w, b = head
    wp, bp = pooler
    hm, ho, vm, vo = hold["merged"], hold["own"], val["merged"], val["own"]
    logits = lambda p, bias=b: p @ w.T + bias  # noqa: E731
    out = {
        "own": score(vo["logits"].squeeze(-1), vo["labels"]),
        "merged": score(vm["logits"].squeeze(-1), vm["labels"]),
    }
    if w.shape[0] == 2:
        m = hm["logits"][:, 1] - hm["logits"][:, 0]
        c = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([c], max_iter=100)

        def loss() -> torch.Tensor:
            opt.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(m + c, hm["labels"])
            value.backward()
            return value

        opt.step(loss)
        shift = torch.tensor([0.0, float(c.detach())], dtype=torch.float64)
        out["bias"] = score(vm["logits"] + shift, vm["labels"]) | {"constant": float(c.detach())}
        vmargin = vm["logits"][:, 1] - vm["logits"][:, 0]
        out["merged"]["auc"] = auc(vmargin, vm["labels"])
        out["own"]["auc"] = auc(vo["logits"][:, 1] - vo["logits"][:, 0], vo["labels"])
        best = max(float(((vmargin > t) == (vm["labels"] == 1)).double().mean()) for t in vmargin)
        out["merged"]["best_threshold_accuracy"] = 100 * best  # an oracle bound for any bias, not a method
    else:
        c = float((hm["labels"] - hm["logits"].squeeze(-1)).mean())
        out["bias"] = score(vm["logits"].squeeze(-1) + c, vm["labels"]) | {"constant": c}
    mu_m, mu_o = hm["pooled"].mean(0), ho["pooled"].mean(0)
    sd_m, sd_o = hm["pooled"].std(0).clamp_min(1e-6), ho["pooled"].std(0)
    out["pooled_mean"] = score(logits(vm["pooled"] - mu_m + mu_o).squeeze(-1), vm["labels"])
    out["pooled_standardize"] = score(logits((vm["pooled"] - mu_m) / sd_m * sd_o + mu_o).squeeze(-1), vm["labels"])
    cm, co = hm["cls"].mean(0), ho["cls"].mean(0)
    csd_m, csd_o = hm["cls"].std(0).clamp_min(1e-6), ho["cls"].std(0)
    cls = (vm["cls"] - cm) / csd_m * csd_o + co
    out["cls_standardize"] = score(logits(torch.tanh(cls @ wp.T + bp)).squeeze(-1), vm["labels"])
    return out


def break_probe(ev: Evaluator, i: int, body: dict[str, torch.Tensor], groups: dict[str, Any]) -> dict[str, float]:
    """Task i's own model with one group of tensors taken from the merged body: {group: score x100}."""
    own = dict(ev.model(i).named_parameters())
    return {
        name: 100 * ev.evaluate(i, body={k: v if picks(k) else own[k].detach() for k, v in body.items()})["score"]
        for name, picks in groups.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--options", default='{"scaling": 1.0}', help="the method's options as JSON")
    parser.add_argument("--data_dir", default="../shared/data/glue")
    parser.add_argument("--max_samples", type=int, default=300)
    parser.add_argument("--fit_split", default="holdout", choices=["holdout", "train"], help="where fixes estimate")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    from research.swap_probe import groups

    method = method_class(args.method)(**json.loads(args.options))
    hold = Evaluator(args.checkpoints, EvalData(args.data_dir, args.fit_split, args.max_samples), "cpu", progress=False)
    val = Evaluator(args.checkpoints, EvalData(args.data_dir, "validation", args.max_samples), "cpu", progress=False)
    body = merge_body(args.checkpoints, method, evaluator=hold)
    named = groups(AutoConfig.from_pretrained(args.checkpoints[0]))
    result: dict[str, Any] = {}
    for i, task in enumerate(val.tasks):
        prefix = next(k for k in body if k.endswith("pooler.dense.weight")).removesuffix("pooler.dense.weight")
        runs = {
            n: {w: forward(ev, i, body if w == "merged" else None) for w in ("own", "merged")}
            for n, ev in (("hold", hold), ("val", val))
        }
        params = dict(val.model(i).named_parameters())
        head = tuple(params[f"classifier.{p}"].detach().double() for p in ("weight", "bias"))
        pooler = tuple(body[f"{prefix}pooler.dense.{p}"].double() for p in ("weight", "bias"))
        result[task] = {
            "representation": representation(runs["val"]["own"], runs["val"]["merged"]),
            "fixes": fixes(head, pooler, runs["hold"], runs["val"]),  # type: ignore[arg-type]
            "break_holdout": break_probe(hold, i, body, {k: v for k, v in named.items() if k not in ("none", "all")}),
        }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
