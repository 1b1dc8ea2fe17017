"""The fine-tuning LightningModule: a Hugging Face sequence classifier with GLUE metrics per eval split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from fmn_pl.metrics import glue_metrics, predictions, with_score
from fmn_pl.options import is_local_path
from fmn_pl.tasks import GlueTask, get_task

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_model(
    name_or_path: str,
    task: GlueTask,
    num_labels: int | None = None,
    attn_implementation: str | None = None,
    max_length: int | None = None,
) -> nn.Module:
    """`AutoModelForSequenceClassification` for `task`, with one-line errors for the usual mistakes (also a
    `max_length` the model has no positions for, `check_max_length`)."""
    if num_labels is not None and num_labels != task.num_labels:
        raise ValueError(f"num_labels={num_labels} disagrees with task {task.name!r}, which has {task.num_labels}")
    if is_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model {name_or_path} does not exist (give a local folder or a hub model name)")
    config = _load_config(name_or_path)
    check_max_length(max_length, config, name_or_path)
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if trained_head and config.num_labels != task.num_labels:
        raise ValueError(
            f"{name_or_path} has a {config.num_labels}-label classifier head but task {task.name!r} needs "
            f"{task.num_labels}"
        )
    model, info = _from_pretrained(name_or_path, task, config.model_type, attn_implementation)
    # A task checkpoint must load exactly: a tensor left out or left over means config.json and the weights
    # disagree (e.g. 5 layers declared, 6 stored), and every later stage would compute on the wrong model.
    if trained_head and (
        odd := [
            *info.get("missing_keys", []),
            *info.get("unexpected_keys", []),
            *[k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])],
        ]
    ):
        raise ValueError(
            f"{name_or_path}: config.json disagrees with the stored weights ({len(odd)} tensor(s) "
            f"missing, left over or of another shape, e.g. {sorted(odd)[0]})"
        )
    return model


def max_positions(config: Any) -> int | None:
    """The longest input (in tokens) `config`'s position embeddings cover: RoBERTa-style models start their
    positions after the padding index, so 514 embeddings hold 512 tokens."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    if "roberta" in config.model_type or config.model_type == "camembert":
        n -= (config.pad_token_id or 0) + 1
    return n


def check_max_length(max_length: int | None, config: Any, source: str) -> None:
    """A one-line error, before any work, for a `max_length` above the model's positions: a row that long would
    crash mid-epoch (an index out of the position table), after hours of training."""
    limit = max_positions(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(
            f"max_length {max_length} is above the {limit} positions of {source} (max_position_embeddings)"
        )


def _load_config(name_or_path: str) -> Any:
    """The model's `AutoConfig`, or a one-line error saying why `name_or_path` is not a model folder or name."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        if Path(name_or_path).expanduser().is_dir() and not (Path(name_or_path).expanduser() / "config.json").is_file():
            raise ValueError(f"model folder {name_or_path} has no config.json: not a Hugging Face model folder") from e
        raise ValueError(f"{name_or_path} is not a Hugging Face model folder or hub name: {_first_line(e)}") from e


def _from_pretrained(
    name_or_path: str, task: GlueTask, model_type: str, attn_implementation: str | None
) -> tuple[nn.Module, dict[str, Any]]:
    """(model, loading info) with `task`'s labels and problem type, or a one-line error for an architecture
    without a classifier, missing weights or an unreadable weight file."""
    from transformers import AutoModelForSequenceClassification

    labels = (
        {}
        if task.is_regression
        else {
            "id2label": dict(enumerate(task.label_names)),
            "label2id": {n: i for i, n in enumerate(task.label_names)},
        }
    )
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name_or_path,
            num_labels=task.num_labels,
            problem_type="regression" if task.is_regression else "single_label_classification",
            output_loading_info=True,
            **labels,
            **kwargs,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(
                f"{name_or_path} ({model_type}) has no sequence-classification model in transformers"
            ) from e
        raise
    except OSError as e:  # e.g. a config.json without weight files
        raise ValueError(f"cannot load model weights from {name_or_path}: {_first_line(e)}") from e
    except Exception as e:  # a truncated or corrupt weight file
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(
            f"{name_or_path}: model.safetensors cannot be read ({_first_line(e)}); export or download it again"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that the Hugging Face model takes (not labels, not row ids)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


class GLUETransformer(L.LightningModule):
    """Fine-tunes one `AutoModelForSequenceClassification` on one GLUE task."""

    def __init__(
        self,
        model_name_or_path: str,
        task: str = "rte",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        adam_epsilon: float = 1e-8,
        num_labels: int | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: hub model name or local folder (a pretrained body or a task checkpoint).
            task: GLUE task; the CLI links it from `data.task`.
            learning_rate: peak AdamW learning rate.
            weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
            warmup_ratio: fraction of all training steps spent warming the learning rate up linearly;
                it then decays linearly to zero.
            adam_epsilon: AdamW epsilon.
            num_labels: optional check: must equal the task's number of labels.
            attn_implementation: "eager", "sdpa", ... (default: transformers' choice).
        """
        super().__init__()
        self.save_hyperparameters()
        self.task = get_task(task)
        self.model = load_model(model_name_or_path, self.task, num_labels, attn_implementation)
        self.model.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps module modes
        self.eval_metrics = nn.ModuleList()
        self.eval_split_names: list[str] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**model_inputs(batch)).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task.is_regression:
            return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
        return nn.functional.cross_entropy(logits, labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch), batch["labels"])
        if self._loggers_write_this_step():
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _loggers_write_this_step(self) -> bool:
        """Log the step loss only where the loggers write it (every `log_every_n_steps`): logging every
        step costs Lightning bookkeeping and, for the progress bar, a device sync on every step."""
        try:
            return bool(self.trainer._logger_connector.should_update_logs)
        except (AttributeError, RuntimeError):  # no trainer attached, or Lightning internals moved
            return True

    # -- evaluation: one metric collection per eval split (MNLI has matched and mismatched) --------------
    def _start_eval(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = list(getattr(dm, "eval_splits", None) or self.task.eval_splits)
        if names != self.eval_split_names:
            self.eval_split_names = names
            self.eval_metrics = nn.ModuleList([glue_metrics(self.task) for _ in names]).to(self.device)
        for m in self.eval_metrics:
            m.reset()

    def _eval_step(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch)
        self.eval_metrics[dataloader_idx].update(predictions(self.task, logits.detach()), batch["labels"])
        # Logits keep their graph when a callback (the Fisher pass) has enabled gradients.
        return {"logits": logits, "labels": batch["labels"]}

    def _end_eval(self, stage: str) -> dict[str, float]:
        results, scores = {}, []
        for name, metrics in zip(self.eval_split_names, self.eval_metrics):
            values = with_score(metrics.compute())
            prefix = stage if len(self.eval_split_names) == 1 else f"{stage}_{name.removeprefix('validation_')}"
            results.update({f"{prefix}/{k}": v for k, v in values.items()})
            scores.append(values["score"])
        score = sum(scores) / len(scores)
        if len(scores) > 1:  # the mean over splits (one split: already in `results`)
            results[f"{stage}/score"] = score
        for key, value in results.items():
            self.log(key, value, prog_bar=key == f"{stage}/score")
        return results

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def configure_optimizers(self) -> Any:
        from transformers import get_linear_schedule_with_warmup

        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "_layer_norm.weight")
        params = [p for p in self.model.named_parameters() if p[1].requires_grad]
        groups = [
            {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": self.hparams.weight_decay},
            {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, eps=self.hparams.adam_epsilon)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
