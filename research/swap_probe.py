"""Which part of a merged body breaks a task: each task of a merge scored with one group of body tensors swapped
back to that task's own checkpoint (the embeddings, each layer, the pooler, every norm; `none` is the merge as
it is, `all` the task's own model). Prints one JSON document {task: {group: score x100}}.

    python research/swap_probe.py --checkpoints runs/checkpoints/mrpc runs/checkpoints/stsb \
        [--method average] [--options '{"power": 1.0}'] [--split holdout] [--max_samples 300]

A task whose score comes back when one group is its own needs that group's parameters in a way the merge lost.
Scores on the held-out training rows by default, so probing never looks at the validation split.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

from fmn_pl import Evaluator, merge_body, method_class
from fmn_pl.evaluate import EvalData
from fmn_pl.merge_inputs import body_prefix
from fmn_pl.nodes import adapter_for, node_shape
from fmn_pl.tensorfile import CheckpointReader


def groups(config: object) -> dict[str, Callable[[str], bool]]:
    """Name -> predicate on body tensor names: none, embeddings, layer<i> for each layer, pooler, norms, all."""
    base = body_prefix(config)[0].rstrip(".")
    adapter = adapter_for(config)
    out: dict[str, Callable[[str], bool]] = {"none": lambda k: False, "embeddings": lambda k: "embeddings" in k}
    for layer in range(node_shape(config)[0]):
        prefix = adapter.layer_prefix(base, layer)
        out[f"layer{layer}"] = lambda k, p=prefix: k.startswith(p)
    out["pooler"] = lambda k: ".pooler." in k
    out["norms"] = lambda k: "norm" in k.lower()
    out["all"] = lambda k: True
    return out


def probe(checkpoints: list[str], method: object, data: EvalData) -> dict[str, dict[str, float]]:
    """{task: {group: score x100}} of the merged body with each group swapped back to the task's own tensors."""
    from transformers import AutoConfig

    evaluator = Evaluator(checkpoints, data, accelerator="cpu", progress=False)
    body = merge_body(checkpoints, method, evaluator=evaluator)
    named = groups(AutoConfig.from_pretrained(checkpoints[0]))  # merge_body checked: one architecture
    out = {}
    for i, task in enumerate(evaluator.tasks):
        reader = CheckpointReader(checkpoints[i])
        own = {k: reader.get(k) for k in body}  # read once: every group swaps from these
        out[task] = {}
        for name, picks in named.items():
            swapped = {k: own[k] if picks(k) else v for k, v in body.items()}
            out[task][name] = 100 * evaluator.evaluate(i, body=swapped)["score"]
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--method", default="average", help="a registered merge method (default: average)")
    parser.add_argument("--options", default="{}", help="the method's options as JSON")
    parser.add_argument("--data_dir", default="../shared/data/glue")
    parser.add_argument("--split", default="holdout", choices=["holdout", "validation", "train"])
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    method = method_class(args.method)(**json.loads(args.options))
    result = probe(args.checkpoints, method, EvalData(args.data_dir, args.split, args.max_samples))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
