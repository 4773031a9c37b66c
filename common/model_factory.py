"""Build the Transformer a task needs, sized by the run config.

Server and clients call this with the same config, so the global model and every local copy share
one architecture and one set of parameter names.
"""

from __future__ import annotations

from torch import nn

from common.hf_model import build_hf_classifier, hf_model_name
from common.models import TabularTransformer, TextTransformer, TransformerConfig
from common.run_config import RunConfig
from common.schema import Schema


def build_model(schema: Schema, config: RunConfig) -> nn.Module:
    """The architecture, freshly initialised; a Hugging Face model's own weights are loaded
    only where the frozen base is built (common/federated_model.py)."""
    if hf_model_name(config) is not None:
        return build_hf_classifier(schema, config, pretrained=False)
    if schema.text is not None:
        return build_text_model(config, len(schema.classes))
    return TabularTransformer(
        len(schema.numeric), schema.category_sizes(), len(schema.classes), _shape(config)
    )


def build_text_model(config: RunConfig, num_classes: int) -> TextTransformer:
    """The text encoder of `config` with a head of any size: pretraining on a public corpus
    uses that corpus' classes, the federation its task's."""
    return TextTransformer(config.vocab_size, config.max_length, num_classes, _shape(config))


def _shape(config: RunConfig) -> TransformerConfig:
    return TransformerConfig(
        width=config.model_width, depth=config.model_depth, heads=config.model_heads
    )
