"""fmn-pl: fine-tune BERT-family models per GLUE task, measure mask-node Fisher, merge them."""

__version__ = "0.1.0"
