"""Checkpoint and resume: the ServerApp continues after the last complete round, losing nothing."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from common.run_config import RunConfig
from server.app import main as server_main
from server.run_record import ResumeError
from tests.local_grid import LocalGrid
from tests.test_update_validation import HOSPITALS


def run_server(tmp_path, **settings) -> dict:
    config = RunConfig.from_mapping({"local-epochs": 1, "run-dir": str(tmp_path), **settings})
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_mapping()
    )
    server_main(grid, context)
    return json.loads((tmp_path / "metrics.json").read_text())


def test_a_resumed_run_continues_its_rounds_and_metrics(tmp_path):
    first = run_server(tmp_path, strategy="fedadam", **{"num-server-rounds": 2})
    resumed = run_server(tmp_path, strategy="fedadam", resume=True, **{"num-server-rounds": 4})
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert resumed["rounds"][:2] == first["rounds"]  # history kept as it was
    assert resumed["initial"] == first["initial"]
    assert resumed["resumed_after_rounds"] == [2]
    assert resumed["status"] == "completed"
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "round-004.safetensors" in checkpoints and "strategy-004.safetensors" in checkpoints


def test_fedadam_moments_survive_the_resume(tmp_path):
    from safetensors.numpy import load_file

    run_server(tmp_path, strategy="fedadam", **{"num-server-rounds": 2})
    saved = load_file(tmp_path / "checkpoints" / "strategy-002.safetensors")
    assert any(key.startswith("m_t/") for key in saved) and any(k.startswith("v_t/") for k in saved)


def test_a_run_directory_without_rounds_cannot_resume_and_is_left_untouched(tmp_path):
    (tmp_path / "metrics.json").write_text('{"rounds": [], "status": "failed"}')
    with pytest.raises(ResumeError, match="no complete round to resume from"):
        run_server(tmp_path, resume=True)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "rounds": [],
        "status": "failed",
    }
