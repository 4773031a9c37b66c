"""Build the Transformer a task needs, sized by the run config.

Server and clients call this with the same config, so the global model and every local copy share
one architecture and one set of parameter names.
"""

from __future__ import annotations

from torch import nn

from common.models import TabularTransformer, TextTransformer, TransformerConfig
from common.run_config import RunConfig
from common.schema import Schema


def build_model(schema: Schema, config: RunConfig) -> nn.Module:
    shape = TransformerConfig(
        width=config.model_width, depth=config.model_depth, heads=config.model_heads
    )
    if schema.text is not None:
        return TextTransformer(config.vocab_size, config.max_length, len(schema.classes), shape)
    return TabularTransformer(
        len(schema.numeric), schema.category_sizes(), len(schema.classes), shape
    )
