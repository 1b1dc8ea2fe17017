"""The shared fixtures build what other tests rely on."""

from transformers import AutoModelForSequenceClassification

from fmn_pl.checkpoint import read_metadata
from tests.conftest import FAMILIES, tiny_model


def test_tiny_checkpoint_loads(make_checkpoint):
    path = make_checkpoint("stsb")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 1 and read_metadata(path)["task"] == "stsb"


def test_every_family_builds():
    for family in FAMILIES:
        assert tiny_model(family).config.model_type == family
