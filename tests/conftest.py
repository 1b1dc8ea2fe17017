"""Shared fixtures: a tiny WordPiece tokenizer, tiny random models per family, tiny GLUE data and
task checkpoints, so unit tests need no download. Real assets live in ../shared (integration tests)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
GLUE = SHARED / "data" / "glue"
GLUE_TSV = SHARED / "data" / "glue_tsv"
requires_shared = pytest.mark.skipif(not MINILM.is_dir(), reason=f"real assets absent: {SHARED} not found")

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, folder: str = "benchmarks") -> ModuleType:
    """<folder>/<name>.py (benchmarks/ or research/) imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run ~15x faster on one thread than on two busy cores (the benchmarks' --threads is global)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAMILIES = ("bert", "roberta", "distilbert", "electra", "xlm-roberta")

WORDS = (
    "the a an is are was were be not no yes good bad great movie film it this that he she they we you i "
    "man woman dog cat plays runs eats reads book car house big small happy sad very really and or but of "
    "to in on at with for from by as its his her their our my one two three new old red blue fast slow"
).split()


def make_sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 12)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved BERT WordPiece tokenizer over WORDS plus single characters (~150 tokens)."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tokenizer")
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'\"-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *[f"##{c}" for c in chars]]
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    # transformers 5 takes `vocab` (a path or dict); `vocab_file=` is silently ignored (every token [UNK])
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"))
    assert len(tok) == len(dict.fromkeys(vocab)) <= 160, len(tok)
    tok.save_pretrained(d)
    return d


def tiny_config(family: str = "bert", vocab_size: int = 160, layers: int = 2, heads: int = 4) -> "object":
    """A tiny random config of `family` (hidden 32, FFN 37: odd sizes catch shape mix-ups)."""
    from transformers import AutoConfig

    if family == "distilbert":
        kw = dict(dim=32, n_layers=layers, n_heads=heads, hidden_dim=37)
    else:
        kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=37)
    return AutoConfig.for_model(family, vocab_size=vocab_size, max_position_embeddings=130, pad_token_id=0, **kw)


def tiny_model(family: str = "bert", num_labels: int = 2, seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny random `AutoModelForSequenceClassification` in eval mode."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    cfg.num_labels = num_labels
    if num_labels == 1:
        cfg.problem_type = "regression"
    return AutoModelForSequenceClassification.from_config(cfg).eval()


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic GLUE data in the nyu-mll/glue parquet layout: 64 train / 32 validation rows per task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fmn_pl.tasks import TASKS

    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    for task in TASKS.values():
        (root / task.name).mkdir()
        for split, n in (("train", 64), *((s, 32) for s in task.eval_splits)):
            cols = {k: [make_sentence(rng) for _ in range(n)] for k in task.text_keys}
            if task.is_regression:
                cols["label"] = pa.array([rng.uniform(0, 5) for _ in range(n)], pa.float32())
            else:
                cols["label"] = pa.array([rng.randrange(task.num_labels) for _ in range(n)], pa.int64())
            cols["idx"] = pa.array(range(n), pa.int32())
            pq.write_table(pa.table(cols), root / task.name / f"{split}.parquet")
    return root


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    """`tiny_base(family)`: a saved tiny 'pretrained' body (bare AutoModel) with the tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    cache: dict[str, Path] = {}

    def make(family: str = "bert") -> Path:
        if family not in cache:
            d = tmp_path_factory.mktemp(f"base-{family}")
            torch.manual_seed(1234)
            AutoModel.from_config(tiny_config(family)).save_pretrained(d)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
            cache[family] = d
        return cache[family]

    return make


def tiny_checkpoint(base: Path, task: str, target: Path, seed: int = 0, noise: float = 0.02) -> Path:
    """An fmn-pl task checkpoint at `target` whose body is `base` plus seeded noise (a stand-in for fine-tuning)
    and whose head is random."""
    from transformers import AutoTokenizer

    from fmn_pl.checkpoint import CheckpointMeta, export_checkpoint
    from fmn_pl.module import load_model
    from fmn_pl.tasks import get_task

    spec = get_task(task)
    torch.manual_seed(seed)
    model = load_model(str(base), spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    meta = CheckpointMeta(
        task=spec.name,
        label_names=list(spec.label_names),
        num_labels=spec.num_labels,
        base_model=str(base),
        seed=seed,
        num_train_examples=0,
    )
    return export_checkpoint(model.eval(), AutoTokenizer.from_pretrained(base), target, meta)


@pytest.fixture
def make_checkpoint(tmp_path: Path, tiny_base: Callable[[str], Path]) -> Callable[..., Path]:
    """`make_checkpoint(task, family="bert", seed=0, noise=0.02)`: `tiny_checkpoint` of the tiny base of
    `family`, in this test's folder."""

    def make(
        task: str = "rte", family: str = "bert", seed: int = 0, noise: float = 0.02, name: str | None = None
    ) -> Path:
        return tiny_checkpoint(tiny_base(family), task, tmp_path / (name or f"{family}-{task}-{seed}"), seed, noise)

    return make
