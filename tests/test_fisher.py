"""Mask-node and full Fisher: mask semantics, numbers against slow independent loops, the callback, the CLI.

The slow references use no hooks: the gradient of the loss w.r.t. a head (neuron) mask at 1 equals
<dL/dW, W> over the attention-output (FFN-output) weight columns that read that head's context (that
neuron's activation), since scaling those columns by m scales the node's contribution by m.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch

from fmn_pl.artifacts import load_artifact
from fmn_pl.data import GLUEDataModule
from fmn_pl.fisher import FullFisher, MaskFisher, MaskFisherCallback, MaskNodes, label_losses
from fmn_pl.fisher_cli import main
from fmn_pl.module import GLUETransformer
from fmn_pl.nodes import adapter_for, node_shape
from tests.conftest import FAMILIES, tiny_model


def _batch(n: int = 5, vocab: int = 160, width: int = 9, seed: int = 0, num_labels: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, width), generator=g)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.rand(n, generator=g) * 5 if num_labels == 1 else torch.randint(0, num_labels, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "idx": torch.arange(n) + 100}


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The last hidden states: far more sensitive to one node than a tiny random model's logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[-1] * batch["attention_mask"][..., None]


def _layer(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.base_model.get_submodule(adapter_for(model.config).layers)[layer]


def _with_node_off(model: torch.nn.Module, batch: dict, kind: str, layer: int, index: int) -> torch.Tensor:
    """Hidden states with one head (kind "head") or FFN neuron ("neuron") masked to 0 by the hooks."""
    layers, heads, ffn = node_shape(model.config)
    nodes = MaskNodes(model)
    with torch.no_grad(), nodes.hooks():
        mask = torch.ones(layers, heads if kind == "head" else ffn)
        mask[layer, index] = 0
        setattr(nodes, kind, mask)
        out = _hidden(model, batch)
    assert not any(m._forward_pre_hooks for m in model.modules()), "hooks must be removed"
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_head_mask_zero_equals_zeroed_value_rows(family: str, attn: str) -> None:
    model = tiny_model(family)
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    adapter = adapter_for(model.config)
    heads = node_shape(model.config)[1]
    batch, (l, h) = _batch(), (1, 2)
    masked = _with_node_off(model, batch, "head", l, h)
    ref = copy.deepcopy(model)
    value = _layer(ref, l).get_submodule(adapter.value)
    d = value.out_features // heads
    with torch.no_grad():
        value.weight[h * d : (h + 1) * d] = 0
        value.bias[h * d : (h + 1) * d] = 0
        expected = _hidden(ref, batch)
        plain = _hidden(model, batch)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert (masked - plain).abs().max() > 1e-3, "the head must matter, or the test proves nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_mask_zero_equals_zeroed_intermediate_row(family: str) -> None:
    model = tiny_model(family).eval()
    adapter = adapter_for(model.config)
    batch, (l, j) = _batch(), (0, 7)
    masked = _with_node_off(model, batch, "neuron", l, j)
    ref = copy.deepcopy(model)
    ffn_in = _layer(ref, l).get_submodule(adapter.ffn_in)
    with torch.no_grad():
        ffn_in.weight[j] = 0
        ffn_in.bias[j] = 0
        expected = _hidden(ref, batch)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)


def test_per_example_masks_act_per_example() -> None:
    model = tiny_model("bert").eval()
    layers, heads, ffn = node_shape(model.config)
    batch = _batch(n=3)
    nodes = MaskNodes(model)
    head = torch.ones(3, layers, heads)
    head[1, 0, 1] = 0
    with torch.no_grad(), nodes.hooks():
        nodes.head = head
        per_example = _hidden(model, batch)
        nodes.head = head[1]
        shared = _hidden(model, batch)
        nodes.head = None
        plain = _hidden(model, batch)
    torch.testing.assert_close(per_example[1], shared[1])
    torch.testing.assert_close(per_example[[0, 2]], plain[[0, 2]])


def test_unsupported_family_is_named() -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: bert, roberta"):
        MaskNodes(_Holder(config))


class _Holder(torch.nn.Module):
    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config


# ---------------------------------------------------------------------------------------------- slow loops


def _node_grads(model: torch.nn.Module, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dm for every head and neuron node at m = 1, from plain weight gradients (no hooks)."""
    adapter = adapter_for(model.config)
    layers, heads, ffn = node_shape(model.config)
    outs = [
        (
            _layer(model, l).get_submodule(adapter.attn_out).weight,
            _layer(model, l).get_submodule(adapter.ffn_out).weight,
        )
        for l in range(layers)
    ]
    grads = torch.autograd.grad(loss, [w for pair in outs for w in pair], retain_graph=True)
    head, neuron = torch.zeros(layers, heads, dtype=torch.float64), torch.zeros(layers, ffn, dtype=torch.float64)
    for l, (wa, wf) in enumerate(outs):
        ga, gf = grads[2 * l], grads[2 * l + 1]
        head[l] = (ga * wa).double().reshape(wa.shape[0], heads, -1).sum((0, 2))
        neuron[l] = (gf * wf).double().sum(0)
    return head, neuron


def _nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return ((logits[:, 0] - y.float()) ** 2).sum()
    return -torch.log_softmax(logits, -1).gather(1, y.long()[:, None]).sum()


def _slow_mask_fisher(model: torch.nn.Module, batches: list[dict], labels: str = "empirical") -> dict:
    """One example at a time (unpadded); expected labels: sum_c p_c g_c^2 with one backward per class."""
    layers, heads, ffn = node_shape(model.config)
    head, neuron, n = torch.zeros(layers, heads, dtype=torch.float64), torch.zeros(layers, ffn, dtype=torch.float64), 0
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            keep = batch["attention_mask"][i].bool()
            logits = model(input_ids=batch["input_ids"][i][keep][None]).logits
            if labels == "empirical":
                terms = [(1.0, _nll(logits, batch["labels"][i : i + 1]))]
            else:
                p = torch.softmax(logits, -1)[0].detach()
                terms = [(float(p[c]), _nll(logits, torch.tensor([c]))) for c in range(logits.shape[-1])]
            for w, loss in terms:
                gh, gn = _node_grads(model, loss)
                head += w * gh**2
                neuron += w * gn**2
            n += 1
    return {"head": (head / n).float(), "neuron": (neuron / n).float()}


def _rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (actual.double() - expected.double()).abs().max() / expected.double().abs().max()
    assert expected.abs().max() > 0 and err < rtol, f"relative error {err:.2e}"


def _run(acc: MaskFisher, batches: list[dict]) -> dict:
    with acc.active():
        for b in batches:
            acc.step(b)
    return acc.result()


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("labels", ["empirical", "expected"])
def test_per_example_mask_fisher_equals_slow_loop(family: str, labels: str) -> None:
    model = tiny_model(family, num_labels=3).eval()
    batches = [_batch(5, seed=0, num_labels=3), _batch(4, seed=1, num_labels=3)]
    fast = _run(MaskFisher(model, "per_example", labels), batches)
    slow = _slow_mask_fisher(model, batches, labels)
    for key in ("head", "neuron"):
        _rel_close(fast[key], slow[key])
    assert all(p.requires_grad for p in model.parameters()), "weights' flags must come back after the pass"


def test_regression_uses_mse() -> None:
    model = tiny_model("bert", num_labels=1).eval()
    batches = [_batch(6, num_labels=1)]
    fast = _run(MaskFisher(model, "per_example", "empirical"), batches)
    slow = _slow_mask_fisher(model, batches, "empirical")
    _rel_close(fast["head"], slow["head"])
    _rel_close(fast["neuron"], slow["neuron"])


def test_per_batch_equals_reference_procedure() -> None:
    """Reference: square the gradient of each (padded) batch's mean loss and sum over batches."""
    model = tiny_model("bert").eval()
    batches = [_batch(5, seed=0), _batch(3, seed=1)]
    fast = _run(MaskFisher(model, "per_batch", "empirical"), batches)
    head, neuron = 0, 0
    for b in batches:
        gh, gn = _node_grads(model, _nll(_logits(model, b), b["labels"]) / len(b["labels"]))
        head, neuron = head + gh**2, neuron + gn**2
    _rel_close(fast["head"], head)
    _rel_close(fast["neuron"], neuron)


def test_sampled_labels_are_seeded_per_example() -> None:
    logits = torch.randn(6, 3)
    idx = torch.arange(6)
    a = label_losses(logits, torch.zeros(6), "sampled", seed=1, idx=idx)[0]
    b = label_losses(logits[[3, 4, 5]], torch.zeros(3), "sampled", seed=1, idx=idx[[3, 4, 5]])[0]
    torch.testing.assert_close(a[3:], b)  # the same example draws the same label, whatever its batch
    draws = torch.stack([label_losses(logits, torch.zeros(6), "sampled", seed=s, idx=idx)[0] for s in range(400)])
    nll = -torch.log_softmax(logits, -1)
    expected = (nll.exp().reciprocal() * nll).sum(-1)  # E_y[-log p_y] = sum_y p_y (-log p_y)
    torch.testing.assert_close(draws.mean(0), expected, rtol=0.1, atol=0.05)


def test_full_fisher_equals_slow_loop() -> None:
    model = tiny_model("bert").eval()
    batches = [_batch(4, seed=2)]
    fast = _run(FullFisher(model, "per_example", "expected"), batches)
    params = dict(model.base_model.named_parameters())
    slow = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    n = 0
    for b in batches:
        for i in range(len(b["labels"])):
            keep = b["attention_mask"][i].bool()
            logits = model(input_ids=b["input_ids"][i][keep][None]).logits
            p = torch.softmax(logits, -1)[0].detach()
            for c in range(logits.shape[-1]):
                model.zero_grad()
                _nll(logits, torch.tensor([c])).backward(retain_graph=True)
                for name, q in params.items():
                    if q.grad is not None:
                        slow[name] += float(p[c]) * q.grad.double() ** 2
            n += 1
    prefix = model.base_model_prefix
    assert set(fast) == {f"{prefix}.{k}" for k in params}
    # One relative tolerance over all parameters: the key bias's true gradient is 0 (softmax ignores a
    # per-query shift), so its entries are rounding noise that no per-tensor tolerance could match.
    _rel_close(
        torch.cat([fast[f"{prefix}.{k}"].reshape(-1) for k in params]),
        torch.cat([(slow[k] / n).reshape(-1) for k in params]),
    )


# ---------------------------------------------------------------------------------------------- pass and CLI


def _dm(ckpt: Path, data: Path, n: int = 37) -> GLUEDataModule:
    return GLUEDataModule(
        task="rte",
        data_dir=str(data),
        tokenizer=str(ckpt),
        eval_splits=["train"],
        max_eval_samples=n,
        eval_batch_size=8,
        unpadded_shards=True,
    )


def _validate(ckpt: Path, data: Path, devices: int, **kw) -> dict:
    cb = MaskFisherCallback(ckpt, metadata={"task": "rte"}, **kw)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    module = GLUETransformer(str(ckpt), "rte")
    trainer.validate(module, datamodule=_dm(ckpt, data), verbose=False)
    assert not any(m._forward_pre_hooks for m in module.modules())
    art = load_artifact(ckpt, "mask_fisher", shapes={"head": (2, 4), "neuron": (2, 37)})
    assert art.metadata["num_examples"] == 37 and art.metadata["kind"] == "mask_fisher"
    return art.load_all()


def test_callback_in_a_users_validate_equals_direct_accumulation(make_checkpoint: Callable, tiny_glue: Path) -> None:
    """In a plain `trainer.validate` (inference mode on), the callback gives the accumulator's numbers."""
    ckpt = make_checkpoint("rte")
    got = _validate(ckpt, tiny_glue, devices=1)
    dm = _dm(ckpt, tiny_glue)
    dm.setup("validate")
    from fmn_pl.module import load_model
    from fmn_pl.tasks import get_task

    ref = _run(MaskFisher(load_model(str(ckpt), get_task("rte")).eval()), list(dm.val_dataloader()))
    for key in ("head", "neuron"):
        _rel_close(got[key], ref[key])


def test_ddp_two_processes_equal_one(make_checkpoint: Callable, tiny_glue: Path) -> None:
    ckpt = make_checkpoint("rte")
    one = _validate(ckpt, tiny_glue, devices=1, labels="sampled", seed=3)
    two = _validate(ckpt, tiny_glue, devices=2, labels="sampled", seed=3)
    for key in one:
        _rel_close(two[key], one[key])


def test_cli_writes_each_kind_with_metadata(make_checkpoint: Callable, tiny_glue: Path) -> None:
    ckpt = make_checkpoint("rte")
    common = [
        "--checkpoint",
        str(ckpt),
        "--data_dir",
        str(tiny_glue),
        "--num_examples",
        "12",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]
    main(common + ["--aggregation", "per_batch", "--labels", "expected", "--seed", "5"])
    art = load_artifact(ckpt, "mask_fisher")
    meta = art.metadata
    assert (meta["task"], meta["split"], meta["num_examples"], meta["aggregation"], meta["labels"], meta["seed"]) == (
        "rte",
        "train",
        12,
        "per_batch",
        "expected",
        5,
    )
    assert meta["nodes"] == [2, 4, 37] and meta["family"] == "bert" and art.get("head").dtype == torch.float32
    main(common + ["--kind", "full"])
    full = load_artifact(ckpt, "full_fisher")
    assert full.metadata["labels"] == "expected" and "bert.encoder.layer.0.intermediate.dense.weight" in full.keys()
    main(common + ["--kind", "grams"])
    assert load_artifact(ckpt, "grams").metadata["num_examples"] == 12


def test_cli_from_yaml(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint("rte")
    cfg = tmp_path / "f.yaml"
    cfg.write_text(
        f"checkpoint: {ckpt}\ndata_dir: {tiny_glue}\nnum_examples: 9\nlabels: sampled\n"
        "trainer:\n  accelerator: cpu\n  enable_progress_bar: false\n"
    )
    main(["--config", str(cfg)])
    assert load_artifact(ckpt, "mask_fisher").metadata["labels"] == "sampled"


def test_config_flags_and_data_round_trip(tmp_path: Path) -> None:
    """The flags parse to a `FisherConfig` (the kinds' options top-level, `trainer` the Trainer options given), and
    its `to_data()` is the YAML `fmn-pl fisher --config` reads back to an equal config (what the pipeline writes)."""
    import yaml

    from fmn_pl.fisher_cli import parse_config
    from fmn_pl.kinds import FisherConfig

    argv = ["--checkpoint", "ck", "--kind", "grams", "--include_padding", "true", "--num_examples", "7"]
    parsed = parse_config([*argv, "--trainer.accelerator", "cpu"])
    assert parsed == FisherConfig("ck", "grams", num_examples=7, include_padding=True, trainer={"accelerator": "cpu"})
    launch = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}  # defaults among them
    configs = [parsed, FisherConfig("ck", num_examples=None, aggregation="per_batch", labels="sampled", trainer=launch)]
    for config in configs:
        path = tmp_path / "f.yaml"
        path.write_text(yaml.safe_dump(config.to_data(), sort_keys=False))
        assert parse_config(["--config", str(path)]) == config
    assert "include_padding" not in configs[1].to_data() and configs[1].to_data()["num_examples"] is None


@pytest.mark.parametrize(
    "args, match",
    [
        (["--task", "sst2"], "is a 'rte' checkpoint, not 'sst2'"),
        (["--kind", "grams", "--labels", "sampled"], "labels does not apply to kind 'grams'"),
        (["--kind", "mask", "--include_padding", "true"], "include_padding does not apply to kind 'mask'"),
        (["--split", "nope"], "nope"),
    ],
)
def test_cli_bad_input(make_checkpoint: Callable, tiny_glue: Path, args: list, match: str) -> None:
    ckpt = make_checkpoint("rte")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        main(["--checkpoint", str(ckpt), "--data_dir", str(tiny_glue), "--trainer.accelerator", "cpu", *args])
    assert not list(ckpt.glob("*fisher*")) and not list(ckpt.glob(".*tmp*"))


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "nope")])


# ---------------------------------------------------------------------------------------------- artifacts


def test_artifact_checks(make_checkpoint: Callable, tiny_glue: Path) -> None:
    from safetensors.torch import save_file

    ckpt = make_checkpoint("rte")
    main(
        [
            "--checkpoint",
            str(ckpt),
            "--data_dir",
            str(tiny_glue),
            "--num_examples",
            "8",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    path = ckpt / "mask_fisher.safetensors"
    good = path.read_bytes()
    art = load_artifact(ckpt, "mask_fisher")
    meta = {k: v if isinstance(v, str) else __import__("json").dumps(v) for k, v in art.metadata.items()}
    tensors = art.load_all()

    other = make_checkpoint("rte", seed=1)
    (other / path.name).write_bytes(good)
    with pytest.raises(ValueError, match="recompute"):
        load_artifact(other, "mask_fisher")
    with pytest.raises(ValueError, match="shape"):
        load_artifact(ckpt, "mask_fisher", shapes={"head": (3, 4)})
    with pytest.raises(ValueError, match="not 'full_fisher'"):
        from fmn_pl.artifacts import Artifact

        Artifact(path, "full_fisher")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_artifact(ckpt, "mask_fisher")
    save_file({**tensors, "head": tensors["head"] * float("nan")}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="NaN"):
        load_artifact(ckpt, "mask_fisher")
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="every entry is zero"):
        load_artifact(ckpt, "mask_fisher")


def test_cli_under_ddp_launcher_equals_one_process(make_checkpoint: Callable, tiny_glue: Path) -> None:
    """`fmn-pl fisher --trainer.strategy ddp --trainer.devices 2` as a user runs it: Lightning relaunches the
    command for rank 1 (gloo on CPU); the artifact equals the single-process one."""
    import os
    import subprocess
    import sys

    ckpt = make_checkpoint("rte")
    args = [
        "--checkpoint",
        str(ckpt),
        "--data_dir",
        str(tiny_glue),
        "--num_examples",
        "21",
        "--batch_size",
        "4",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]
    main(args)
    one = load_artifact(ckpt, "mask_fisher").load_all()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", "fisher", *args, "--trainer.strategy", "ddp", "--trainer.devices", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    art = load_artifact(ckpt, "mask_fisher")
    assert art.metadata["world_size"] == 2 and art.metadata["num_examples"] == 21
    for key, value in art.load_all().items():
        _rel_close(value, one[key])


def test_hooks_and_flags_restored_when_the_pass_fails(make_checkpoint: Callable, tiny_glue: Path, monkeypatch) -> None:
    ckpt = make_checkpoint("rte")
    calls = []

    def failing_step(self: MaskFisher, batch: dict) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        MaskFisher.__dict__["_orig_step"](self, batch)

    monkeypatch.setattr(MaskFisher, "_orig_step", MaskFisher.step, raising=False)
    monkeypatch.setattr(MaskFisher, "step", failing_step)
    module = GLUETransformer(str(ckpt), "rte")
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MaskFisherCallback(ckpt)],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.validate(module, datamodule=_dm(ckpt, tiny_glue), verbose=False)
    assert not any(m._forward_pre_hooks for m in module.modules())
    assert all(p.requires_grad for p in module.parameters())
    assert not list(ckpt.glob("*mask_fisher*"))


def test_deberta_v2_adapter_semantics() -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "deberta-v2",
        vocab_size=160,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    model = AutoModelForSequenceClassification.from_config(config).eval()
    batch = _batch()
    masked = _with_node_off(model, batch, "head", 1, 3)
    value = _layer(model, 1).get_submodule(adapter_for(config).value)
    with torch.no_grad():
        value.weight[24:32] = 0
        value.bias[24:32] = 0
        expected = _hidden(model, batch)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(aggregation="per_token"), dict(labels="soft")])
def test_bad_modes_are_refused_when_the_callback_is_built(bad: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        MaskFisherCallback(tmp_path, **bad)
