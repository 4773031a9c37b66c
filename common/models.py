"""Small transformers for tabular and text data that train correctly under Opacus DP-SGD.

Written in the style of nanoGPT's model.py: a config, the blocks bottom-up, then the two models.

Opacus computes per-sample gradients with hooks on known leaf modules, so three rules shape
everything below:

1. Every parameter lives in an ``nn.Linear``, ``nn.LayerNorm`` or ``nn.Embedding`` leaf. A raw
   ``nn.Parameter`` (a [CLS] vector, a numeric-feature weight) falls back to Opacus' functorch
   path, which silently gets per-sample gradients wrong when the owning module's forward takes
   keyword arguments; so those are ``nn.Embedding`` lookups instead.
2. Embedding lookups use ids expanded to the full batch shape ([B, ...]), never a [1, ...]
   tensor broadcast later: Opacus reads the batch dimension off the ids. They are made
   contiguous, because ghost clipping flattens them with ``view``.
3. Attention is written by hand with ``F.scaled_dot_product_attention``. ``nn.MultiheadAttention``
   and ``nn.TransformerEncoderLayer`` get wrong per-sample gradients with ``batch_first=True``.

``forward`` takes positional tensors only, because Opacus' data loaders call ``model(*inputs)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TransformerConfig:
    """Shared by both models. Tiny defaults on purpose: DP-SGD on CPU, a few hundred rows."""

    width: int = 32  # d_model
    depth: int = 2  # number of blocks
    heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.width <= 0 or self.depth <= 0 or self.heads <= 0 or self.mlp_ratio <= 0:
            raise ValueError(f"width, depth, heads and mlp_ratio must be positive: {self}")
        if self.width % self.heads != 0:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1): {self.dropout}")


def _init_embedding(embedding: nn.Embedding, width: int) -> None:
    """Uniform(-1/sqrt(d), 1/sqrt(d)), as in FT-Transformer: keeps tokens on the scale of Linear
    outputs instead of nn.Embedding's default N(0, 1)."""
    bound = 1.0 / math.sqrt(width)
    nn.init.uniform_(embedding.weight, -bound, bound)


class SelfAttention(nn.Module):
    """Multi-head self-attention from plain Linears, so Opacus can hook every projection."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.query = nn.Linear(config.width, config.width)
        self.key = nn.Linear(config.width, config.width)
        self.value = nn.Linear(config.width, config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.proj_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x: [B, T, C]; padding_mask: bool [B, T], True = real token (None = all real)."""
        B, T, C = x.shape
        # [B, T, C] -> [B, heads, T, C // heads]
        q = self.query(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = self.key(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = self.value(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        attn_mask = None
        if padding_mask is not None:
            # Bool mask, True = may attend. [B, T] -> [B, 1, 1, T]: every query, every head.
            attn_mask = padding_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads side by side
        return self.proj_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.width
        self.fc = nn.Linear(config.width, hidden)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(hidden, config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: normalising before each sublayer trains stably without
    warm-up, which matters when DP-SGD clips and noises every step."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), padding_mask)
        x = x + self.mlp(self.ln2(x))
        return x


class TabularTransformer(nn.Module):
    """FT-Transformer (Gorishniy et al., 2021): one token per feature plus [CLS], then blocks.

    Numeric feature i becomes the token ``x_i * w_i + b_i``; categorical feature j becomes an
    embedding of its value. ``category_sizes`` must already count any "unknown" slot the caller
    reserves (e.g. index 0). Either kind of feature may be absent, but not both.
    """

    def __init__(
        self,
        num_numeric: int,
        category_sizes: Sequence[int],
        num_classes: int,
        config: TransformerConfig = TransformerConfig(),  # frozen, so one shared default is safe
    ) -> None:
        super().__init__()
        category_sizes = [int(size) for size in category_sizes]
        if num_numeric < 0:
            raise ValueError(f"num_numeric must be >= 0: {num_numeric}")
        if num_numeric == 0 and not category_sizes:
            raise ValueError("need at least one numeric or categorical feature")
        if any(size <= 0 for size in category_sizes):
            raise ValueError(f"every category size must be positive: {category_sizes}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive: {num_classes}")
        self.config = config
        self.num_numeric = num_numeric
        self.num_categorical = len(category_sizes)
        width = config.width

        # Numeric tokenizer: per-feature weight and bias, stored as embeddings (rule 1 above).
        # None when there are no numeric features: a 0-row parameter only confuses Opacus.
        self.numeric_weight = nn.Embedding(num_numeric, width) if num_numeric else None
        self.numeric_bias = nn.Embedding(num_numeric, width) if num_numeric else None
        self.register_buffer("numeric_ids", torch.arange(num_numeric), persistent=False)

        # Categorical tokenizer: one table over all vocabularies, feature j starts at offset j.
        self.categorical = nn.Embedding(sum(category_sizes), width) if category_sizes else None
        offsets = torch.tensor([0, *category_sizes], dtype=torch.long).cumsum(0)[:-1]  # [K]
        self.register_buffer("category_offsets", offsets, persistent=False)

        self.cls = nn.Embedding(1, width)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

        for embedding in (self.numeric_weight, self.numeric_bias, self.categorical, self.cls):
            if embedding is not None:
                _init_embedding(embedding, width)

    def forward(self, numeric: Tensor, categorical: Tensor) -> Tensor:
        """numeric: float [B, num_numeric]; categorical: long [B, num_categorical] -> [B, classes].

        Pass an empty [B, 0] tensor for a kind of feature the model does not have.
        """
        B = numeric.shape[0]
        tokens = [self.cls(torch.zeros(B, 1, dtype=torch.long, device=numeric.device))]  # [B,1,C]
        if self.numeric_weight is not None and self.numeric_bias is not None:
            ids = self.numeric_ids.expand(B, -1).contiguous()  # [B, F]: rule 2
            x = numeric.unsqueeze(-1)  # [B, F, 1]
            tokens.append(self.numeric_weight(ids) * x + self.numeric_bias(ids))  # [B, F, C]
        if self.categorical is not None:
            tokens.append(self.categorical(categorical + self.category_offsets))  # [B, K, C]
        x = torch.cat(tokens, dim=1)  # [B, 1 + F + K, C]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x[:, 0])  # [CLS] only: [B, C]
        return self.head(x)


class TextTransformer(nn.Module):
    """Encoder-only text classifier: token + learned position embeddings, blocks, then the mean
    of the real tokens' final states (pooling ignores padding, so padded ids never matter)."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        num_classes: int,
        config: TransformerConfig = TransformerConfig(),  # frozen, so one shared default is safe
    ) -> None:
        super().__init__()
        if vocab_size <= 0 or max_length <= 0 or num_classes <= 0:
            raise ValueError("vocab_size, max_length and num_classes must be positive")
        self.config = config
        self.max_length = max_length
        self.token = nn.Embedding(vocab_size, config.width)
        self.position = nn.Embedding(max_length, config.width)
        self.register_buffer("position_ids", torch.arange(max_length), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, num_classes)

        _init_embedding(self.token, config.width)
        _init_embedding(self.position, config.width)

    def forward(self, token_ids: Tensor, padding_mask: Tensor) -> Tensor:
        """token_ids: long [B, T]; padding_mask: bool [B, T], True = real token -> [B, classes].

        T may be anything up to max_length. A row with no real tokens gives finite logits (the
        head's bias) rather than NaN.
        """
        B, T = token_ids.shape
        if T > self.max_length:
            raise ValueError(f"sequence length {T} exceeds max_length {self.max_length}")
        padding_mask = padding_mask.bool()
        positions = self.position_ids[:T].expand(B, T).contiguous()  # [B, T]: rule 2
        x = self.dropout(self.token(token_ids) + self.position(positions))  # [B, T, C]
        # A row that is all padding would make softmax over zero keys -> NaN. Let such rows
        # attend everywhere; pooling below still ignores them.
        attn_mask = padding_mask | ~padding_mask.any(dim=1, keepdim=True)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln_f(x)
        weights = padding_mask.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # [B, C]
        return self.head(pooled)
