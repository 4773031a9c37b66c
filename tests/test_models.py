"""Specifications for common.models: shapes, masking, and exact per-sample gradients in Opacus."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common.models import TabularTransformer, TextTransformer, TransformerConfig

CONFIG = TransformerConfig(width=16, depth=2, heads=4, mlp_ratio=2)
CATEGORY_SIZES = (4, 3, 5)  # each already includes index 0 = "unknown"
VOCAB, MAX_LENGTH = 50, 12
BATCH = 6

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]


def tabular_model(num_numeric: int = 3, category_sizes=CATEGORY_SIZES) -> TabularTransformer:
    torch.manual_seed(0)
    return TabularTransformer(num_numeric, category_sizes, num_classes=3, config=CONFIG)


def tabular_batch(num_numeric: int = 3, category_sizes=CATEGORY_SIZES) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    numeric = torch.randn(BATCH, num_numeric)
    columns = [torch.randint(0, size, (BATCH,)) for size in category_sizes]
    categorical = torch.stack(columns, dim=1) if columns else torch.empty(BATCH, 0).long()
    return numeric, categorical


def text_model() -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(VOCAB, MAX_LENGTH, num_classes=2, config=CONFIG)


def text_batch(length: int = 8) -> tuple[Tensor, Tensor]:
    """Rows of different real lengths (1 .. length), padded with id 0 on the right."""
    torch.manual_seed(2)
    token_ids = torch.randint(1, VOCAB, (BATCH, length))
    real_lengths = torch.tensor([length, 1, 3, length - 1, 5, 2])
    padding_mask = torch.arange(length)[None, :] < real_lengths[:, None]
    return token_ids.masked_fill(~padding_mask, 0), padding_mask


def assert_per_sample_grads_match_loop(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Opacus' per-sample gradients equal a loop of single-example backward passes, for every
    trainable parameter; a frozen one gets none."""
    model = model.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    labels = torch.arange(BATCH) % 2
    reference = copy.deepcopy(model)

    wrapped = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(wrapped(*inputs), labels, reduction="sum").backward()

    looped: dict[str, list[Tensor]] = {name: [] for name, _ in reference.named_parameters()}
    for i in range(BATCH):
        reference.zero_grad()
        one = tuple(x[i : i + 1] for x in inputs)
        F.cross_entropy(reference(*one), labels[i : i + 1], reduction="sum").backward()
        for name, p in reference.named_parameters():
            looped[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))

    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None, f"frozen {name} has per-sample grads"
            continue
        assert p.grad_sample is not None, f"Opacus computed no per-sample grad for {name}"
        expected = torch.stack(looped[name])
        error = (p.grad_sample - expected).norm() / expected.norm().clamp(min=1e-12)
        assert error < 1e-3, f"{name}: relative error {error:.2e}"


# ------------------------------------------------------------------------- Opacus compatibility


@pytest.mark.parametrize("make", [tabular_model, text_model], ids=["tabular", "text"])
def test_models_pass_opacus_validator(make) -> None:
    assert ModuleValidator.validate(make(), strict=False) == []


@pytest.mark.parametrize("make", [tabular_model, text_model], ids=["tabular", "text"])
def test_every_parameter_lives_in_a_leaf_module_opacus_supports(make) -> None:
    """A raw nn.Parameter on a custom module can get silently wrong per-sample grads."""
    supported = (nn.Linear, nn.LayerNorm, nn.Embedding)
    for name, module in make().named_modules():
        if list(module.parameters(recurse=False)):
            assert isinstance(module, supported), f"{name} ({type(module).__name__}) owns params"


def test_tabular_per_sample_grads_match_single_example_loop() -> None:
    assert_per_sample_grads_match_loop(tabular_model(), tabular_batch())


def test_text_per_sample_grads_match_single_example_loop_with_padding() -> None:
    assert_per_sample_grads_match_loop(text_model(), text_batch())


def test_tabular_trains_under_privacy_engine_with_positional_batches() -> None:
    numeric, categorical = tabular_batch()
    labels = torch.arange(BATCH) % 3
    model = tabular_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(numeric, categorical, labels), batch_size=BATCH)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    for *inputs, y in loader:
        if len(y) == 0:  # Poisson sampling can draw an empty batch
            continue
        optimizer.zero_grad()
        F.cross_entropy(model(*inputs), y).backward()
        optimizer.step()
    after = list(model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def clipped_step(model: nn.Module, inputs: tuple[Tensor, ...], mode: str) -> list[Tensor]:
    """The parameters after one DP-SGD step without noise, clipped under `mode`."""
    labels = torch.arange(BATCH) % 2
    loader = DataLoader(TensorDataset(*inputs, labels), batch_size=BATCH)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ghost = mode == "ghost"
    wrapped = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.05,  # small enough that every example is clipped
        poisson_sampling=False,
        grad_sample_mode=mode,
        **({"criterion": nn.CrossEntropyLoss()} if ghost else {}),
    )
    model, optimizer = wrapped[0], wrapped[1]
    loss_function = wrapped[2] if ghost else F.cross_entropy
    optimizer.zero_grad()
    loss_function(model(*inputs), labels).backward()
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("make_model", "make_batch"), [(tabular_model, tabular_batch), (text_model, text_batch)]
)
@pytest.mark.parametrize("mode", ["ew", "ghost"])
def test_every_mode_takes_the_same_step_as_per_sample_hooks(make_model, make_batch, mode):
    """Expanded weights (Confide's default) and ghost clipping compute per-sample gradients, or
    their norms, their own way, yet must clip the same: one noiseless step lands where Opacus'
    per-sample hooks land (and those match a loop over single examples, above)."""
    hooks = clipped_step(make_model(), make_batch(), "hooks")
    other = clipped_step(make_model(), make_batch(), mode)
    start = list(make_model().parameters())
    assert any(not torch.equal(h, s) for h, s in zip(hooks, start, strict=True))
    for h, o in zip(hooks, other, strict=True):
        torch.testing.assert_close(o, h, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------- behaviour


def test_tabular_output_shape_is_batch_by_classes() -> None:
    assert tabular_model()(*tabular_batch()).shape == (BATCH, 3)


def test_tabular_works_with_only_numeric_features() -> None:
    logits = tabular_model(category_sizes=())(*tabular_batch(category_sizes=()))
    assert logits.shape == (BATCH, 3) and torch.isfinite(logits).all()


def test_tabular_works_with_only_categorical_features() -> None:
    logits = tabular_model(num_numeric=0)(*tabular_batch(num_numeric=0))
    assert logits.shape == (BATCH, 3) and torch.isfinite(logits).all()


def test_tabular_rejects_a_model_with_no_features() -> None:
    with pytest.raises(ValueError):
        TabularTransformer(0, (), num_classes=2, config=CONFIG)


def test_tabular_categorical_offsets_keep_features_apart() -> None:
    """The same value in different categorical columns must map to different embeddings."""
    model = tabular_model(num_numeric=0, category_sizes=(3, 3)).eval()
    swapped = model(torch.empty(1, 0), torch.tensor([[1, 2]]))
    original = model(torch.empty(1, 0), torch.tensor([[2, 1]]))
    assert not torch.allclose(swapped, original)


def test_text_output_shape_is_batch_by_classes() -> None:
    assert text_model()(*text_batch()).shape == (BATCH, 2)


def test_text_accepts_sequences_shorter_than_max_length() -> None:
    assert text_model()(*text_batch(length=6)).shape == (BATCH, 2)


def test_text_rejects_sequences_longer_than_max_length() -> None:
    token_ids = torch.zeros(1, MAX_LENGTH + 1, dtype=torch.long)
    with pytest.raises(ValueError):
        text_model()(token_ids, torch.ones_like(token_ids, dtype=torch.bool))


def test_text_logits_ignore_what_padded_positions_contain() -> None:
    model = text_model().eval()
    token_ids, padding_mask = text_batch()
    other_padding = torch.randint(1, VOCAB, token_ids.shape)
    changed = torch.where(padding_mask, token_ids, other_padding)
    assert not torch.equal(changed, token_ids)
    torch.testing.assert_close(model(changed, padding_mask), model(token_ids, padding_mask))


def test_text_row_with_no_real_tokens_gives_finite_logits() -> None:
    token_ids, padding_mask = text_batch()
    padding_mask[1] = False
    assert torch.isfinite(text_model()(token_ids, padding_mask)).all()


def test_config_rejects_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError):
        TransformerConfig(width=30, heads=4)
