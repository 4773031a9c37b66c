"""`confide pretrain` and `init-checkpoint`: a text encoder trained centrally on the public CLINC150
corpus, and a federation whose global model starts from it with its own fresh head."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common.checkpoint import load_weights, save_weights
from common.evaluation import evaluate
from common.model_factory import build_text_model
from common.pretrained_checkpoint import (
    CHECKPOINT_DIR,
    InitCheckpointError,
    initial_state,
    resolve_checkpoint,
)
from common.public_corpus import CorpusError, load_corpus
from common.run_config import RunConfig
from common.tasks import task_schema
from server.coordinator.coordinator import CoordinatorError
from server.coordinator.coordinator_run import RunRequest, run_config_for
from simulations.scenario import load_scenario

CONFIDE = [sys.executable, "-m", "confide"]
CLINC_SHA256 = "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0"  # its README
SHIPPED = "clinc150-text.safetensors"


def confide(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CONFIDE, *args], capture_output=True, text=True, timeout=300)


def banking77(**settings: object) -> RunConfig:
    """The banking77 scenario as `confide simulate banking77 --set ...` runs it."""
    return load_scenario("banking77", {k.replace("_", "-"): v for k, v in settings.items()}).config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretraining (600 queries, 2 epochs) by the command a user runs."""
    path = tmp_path_factory.mktemp("pretrained") / "clinc.safetensors"
    result = confide(
        "pretrain", "banking77", "--out", str(path), "--max-queries", "600", "--epochs", "2"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation accuracy" in result.stdout
    return path


def refusal(**settings: object) -> str:
    config = banking77(**settings)
    with pytest.raises(InitCheckpointError) as caught:
        initial_state(task_schema(config), config)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"init-checkpoint {config.init_checkpoint!r}: ")
    return message


def test_the_checkpoint_records_the_architecture_and_the_corpus(checkpoint: Path) -> None:
    config = banking77()
    with safe_open(str(checkpoint), framework="pt") as stored:
        metadata = stored.metadata()
    assert metadata["corpus"] == "clinc150"
    assert metadata["corpus-sha256"] == CLINC_SHA256
    assert metadata["train-queries"] == "600"
    expected = {"vocab-size": 8192, "max-length": 32, "model-width": 64, "model-depth": 2}
    assert {key: int(metadata[key]) for key in expected} == expected
    assert (config.model_width, config.max_length) == (64, 32)  # the scenario's, not the defaults


def test_a_banking77_model_starts_from_every_tensor_but_the_head(checkpoint: Path) -> None:
    config = banking77(init_checkpoint=str(checkpoint))
    stored = load_weights(checkpoint)
    torch.manual_seed(0)
    started = initial_state(task_schema(config), config)
    torch.manual_seed(0)
    fresh = initial_state(task_schema(banking77()), banking77())
    assert set(started) == set(fresh)
    for name, tensor in started.items():
        if name.startswith("head."):
            assert tensor.shape[0] == 77
            assert torch.equal(tensor, fresh[name])  # freshly initialised, as without a checkpoint
        else:
            assert torch.equal(tensor, stored[name]), name
            assert not torch.equal(tensor, fresh[name]), name
    assert stored["head.weight"].shape[0] == 150


def test_a_tiny_pretraining_beats_chance_on_clinc_validation(checkpoint: Path) -> None:
    config = banking77()
    corpus = load_corpus("clinc150", config.vocab_size, config.max_length)
    model = build_text_model(config, len(corpus.intents))
    model.load_state_dict(load_weights(checkpoint))
    accuracy = evaluate(model, corpus.validation, 256, torch.device("cpu")).accuracy
    assert len(corpus.intents) == 150 and len(corpus.validation) == 3000
    assert accuracy > 5 / 150  # chance is 1/150


def test_a_missing_checkpoint_is_refused_naming_where_it_was_looked_for(tmp_path: Path) -> None:
    message = refusal(init_checkpoint=str(tmp_path / "none.safetensors"))
    assert "no such file" in message and "confide pretrain banking77 --out" in message


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("not weights")
    assert "is not a checkpoint" in refusal(init_checkpoint=str(path))


def test_weights_without_pretraining_metadata_are_refused(tmp_path: Path, checkpoint: Path) -> None:
    path = tmp_path / "model.safetensors"  # e.g. a run's final model
    save_weights(load_weights(checkpoint), path, {"task": "banking77"})
    assert "is not a pretrained checkpoint" in refusal(init_checkpoint=str(path))


def test_an_incomplete_checkpoint_is_refused_naming_the_tensor(
    tmp_path: Path, checkpoint: Path
) -> None:
    with safe_open(str(checkpoint), framework="pt") as stored:
        metadata = stored.metadata()
    weights = load_weights(checkpoint)
    del weights["blocks.1.mlp.fc.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_weights(weights, path, metadata)
    message = refusal(init_checkpoint=str(path))
    assert "incomplete or altered (blocks.1.mlp.fc.weight missing)" in message


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_settings(
    checkpoint: Path,
) -> None:
    message = refusal(init_checkpoint=str(checkpoint), model_width=32, vocab_size=4096)
    assert "made for another architecture" in message
    assert "--set vocab-size=8192 --set model-width=64" in message


def test_a_checkpoint_for_a_tabular_task_is_refused(checkpoint: Path) -> None:
    config = load_scenario("heart", {"init-checkpoint": str(checkpoint)}).config
    with pytest.raises(InitCheckpointError, match="task 'heart' is tabular"):
        initial_state(task_schema(config), config)


def test_simulate_refuses_a_bad_checkpoint_in_one_line_before_anything_runs(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing.safetensors"
    run_dir = tmp_path / "run"
    result = confide(
        "simulate", "banking77", "--set", f"init-checkpoint={missing}", "--set", "dp=true",
        "--out", str(run_dir), "--quiet",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"init-checkpoint '{missing}'" in result.stderr
    assert not run_dir.exists()  # no run started, no site's ledger charged


def test_a_relative_path_names_a_shipped_checkpoint_else_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(SHIPPED) == CHECKPOINT_DIR / SHIPPED
    assert resolve_checkpoint("mine.safetensors") == tmp_path / "mine.safetensors"


def test_the_shipped_checkpoint_fits_the_banking77_scenario() -> None:
    config = banking77(init_checkpoint=SHIPPED)
    state = initial_state(task_schema(config), config)
    assert torch.equal(
        state["token.weight"], load_weights(CHECKPOINT_DIR / SHIPPED)["token.weight"]
    )


def test_an_unknown_corpus_is_refused_naming_the_shipped_ones() -> None:
    with pytest.raises(CorpusError, match="use one of clinc150"):
        load_corpus("wikipedia", 8192, 32)


def test_a_coordinator_run_sends_its_own_checkpoint_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp starts in the coordinator's working directory, not the operator's."""
    shutil.copy(CHECKPOINT_DIR / SHIPPED, tmp_path / "own.safetensors")
    monkeypatch.chdir(tmp_path)
    request = RunRequest(tmp_path, tmp_path / "run", overrides=b77_overrides("own.safetensors"))
    assert run_config_for(request, 2).init_checkpoint == str(tmp_path / "own.safetensors")


def test_a_coordinator_run_sends_a_shipped_checkpoint_by_name(tmp_path: Path) -> None:
    """Every site has its own copy of a shipped checkpoint, wherever Confide is installed."""
    request = RunRequest(tmp_path, tmp_path / "run", overrides=b77_overrides(SHIPPED))
    assert run_config_for(request, 2).init_checkpoint == SHIPPED


def test_a_coordinator_run_refuses_a_bad_checkpoint_before_it_is_submitted(tmp_path: Path) -> None:
    request = RunRequest(tmp_path, tmp_path / "run", overrides=b77_overrides("none.safetensors"))
    with pytest.raises(CoordinatorError, match=r"init-checkpoint '/.*/none\.safetensors': no such"):
        run_config_for(request, 2)


def b77_overrides(init_checkpoint: str) -> dict[str, object]:
    return {
        "task": "banking77",
        "max-length": 32,
        "model-width": 64,
        "init-checkpoint": init_checkpoint,
    }
