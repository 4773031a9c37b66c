"""A site runs only the ClientApp it installed (client/site_executor.py, client/pinned_app.py).

The fast tests compare app packages built by Flower's own build from small projects. The slow
ones share one real federation (TLS coordinator behind nginx, a hospital and a bank on 127.0.0.1):
a normal run trains through the pinned executor, and a coordinator that ships a modified ClientApp
is refused before a line of it runs, with the reason in the run's record and in the sites' logs.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.flower_runtime import (
    CLIENT_APP_TASK,
    REFUSED_APP,
    TaskInput,
    build_app_package,
)
from client.join import EXECUTOR_LOG
from client.pinned_app import installed_app, read_app_package, refusal
from client.site_executor import Verdicts, answer
from common.run_config import PROJECT_ROOT
from tests.deployment_fixtures import SITES, Federation, confide, running_federation

RUN_TIMEOUT = 600
APP = {
    "client/__init__.py": "",
    "client/app.py": '"""The ClientApp."""\n\nROUNDS = 3\n',
    "client/training.py": "def train() -> None:\n    pass\n",
    "README.md": "# An app\n",
}


def make_app(root: Path, files: dict[str, str] | None = None) -> Path:
    """A small Flower app with Confide's own manifest (pyproject.toml)."""
    root.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    for path, text in (APP if files is None else files).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


@pytest.fixture
def installed(tmp_path):
    return installed_app(make_app(tmp_path / "installed"))


def package(root: Path) -> bytes:
    return build_app_package(root)


# ----------------------------------------------------------------------------- fast, no network


def test_the_same_app_rebuilt_elsewhere_passes(installed, tmp_path):
    rebuilt = make_app(tmp_path / "coordinator-checkout")
    with (rebuilt / "pyproject.toml").open("a") as manifest:  # Flower rewrites it: settings count
        manifest.write("\n# a comment the coordinator added\n")
    assert refusal(package(rebuilt), installed) is None


def test_one_changed_byte_in_a_python_file_fails(installed, tmp_path):
    changed = make_app(
        tmp_path / "changed", {**APP, "client/app.py": APP["client/app.py"][:-2] + "4\n"}
    )
    reason = refusal(package(changed), installed)
    assert reason is not None and reason.startswith("refused: the run's app package (sha256 ")
    assert f"is not the app this site installed (sha256 {installed.digest[:12]}): " in reason
    assert reason.endswith(": client/app.py differs")


def test_an_extra_file_fails(installed, tmp_path):
    extra = make_app(tmp_path / "extra", {**APP, "client/sitecustomize.py": "import os\n"})
    assert refusal(package(extra), installed).endswith(": client/sitecustomize.py added")


def test_a_missing_file_fails(installed, tmp_path):
    missing = make_app(tmp_path / "missing", {k: v for k, v in APP.items() if "training" not in k})
    assert refusal(package(missing), installed).endswith(": client/training.py missing")


def test_a_changed_setting_fails(installed, tmp_path):
    changed = make_app(tmp_path / "settings")
    manifest = changed / "pyproject.toml"
    manifest.write_text(manifest.read_text().replace('clientapp = "client.app:app"',
                                                      'clientapp = "client.other:app"'))  # fmt: skip
    assert refusal(package(changed), installed).endswith(": pyproject.toml differs")


def test_an_unreadable_package_is_refused_not_opened(installed):
    assert "the run's app package is unreadable (not a zip archive)" in refusal(
        b"PK junk", installed
    )


def zipped(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return buffer.getvalue()


class FakeTask:
    """A claimed task as the executor sees it, recording the reply instead of pushing it."""

    def __init__(self, given: TaskInput) -> None:
        self.given, self.replies = given, []

    def pull_input(self) -> TaskInput:
        return self.given

    def reply(self, reply: Message, context: Context, failure: str | None = None) -> None:
        self.replies.append((reply, failure))


def task_with(package: bytes, task_type: str = CLIENT_APP_TASK) -> FakeTask:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    context = Context(run_id=7, node_id=1, node_config={"name": "hospital-1"},
                      state=RecordDict(), run_config={})  # fmt: skip
    return FakeTask(TaskInput(task_type, 7, package, message, context))


def test_the_executor_refuses_a_foreign_package_without_calling_the_app():
    verdicts = Verdicts(read_app_package(zipped(APP)))
    called = []
    task = task_with(zipped({**APP, "client/app.py": "import os\n"}))
    answer(task, lambda msg, ctx: called.append(msg) or msg, verdicts)
    ((reply, failure),) = task.replies
    assert not called
    assert reply.error.code == REFUSED_APP and reply.error.reason == failure
    assert failure.startswith("hospital-1: refused: the run's app package (sha256 ")
    assert failure.endswith(": client/app.py differs")


def test_the_executor_runs_the_installed_app_on_the_same_package():
    verdicts = Verdicts(read_app_package(zipped(APP)))
    task = task_with(zipped(APP))
    answer(task, lambda msg, ctx: Message(RecordDict(), reply_to=msg), verdicts)
    ((reply, failure),) = task.replies
    assert failure is None and not reply.has_error()


def test_the_executor_refuses_any_other_kind_of_task():
    verdicts = Verdicts(read_app_package(zipped(APP)))
    task = task_with(zipped(APP), task_type="flwr-agentapp")
    answer(task, lambda msg, ctx: pytest.fail("the app ran"), verdicts)
    assert "not a flwr-agentapp task" in task.replies[0][1]


# ----------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    with running_federation(tmp_path_factory.mktemp("pinned")) as fed:
        yield fed


def executor_log(fed: Federation, name: str) -> str:
    return (fed.root / "nodes" / name / EXECUTOR_LOG).read_text(errors="replace")


@pytest.mark.slow
def test_a_run_trains_through_the_pinned_executor(federation):
    fed, out = federation, federation.root / "run"
    result = confide(
        "coordinator", "run", "--state", str(fed.state), "--rounds", "1", "--set",
        "local-epochs=1", "--set", "dp=true",  # a site's default policy requires DP-SGD
        "--out", str(out), "--quiet", "--wait-timeout", "120",
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert {c["name"] for c in metrics["rounds"][0]["clients"] if "train_examples" in c} == set(
        SITES
    )
    for name in SITES:
        assert "train message answered in" in executor_log(fed, name)
        # Flower's own executor installs every package it runs under FLWR_HOME/apps: none was.
        assert not (fed.root / "nodes" / name / "flwr-home" / "apps").exists()


@pytest.mark.slow
def test_a_modified_client_app_is_refused_before_it_runs(federation, tmp_path):
    fed, marker = federation, tmp_path / "the-coordinators-code-ran"
    hostile = tmp_path / "confide-modified"
    shutil.copytree(PROJECT_ROOT, hostile, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "build"
    ))  # fmt: skip
    with (hostile / "client" / "app.py").open("a") as app:
        app.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    out = tmp_path / "run"
    result = confide(  # run from the copy: `confide coordinator run` packs the project it runs from
        "coordinator", "run", "--state", str(fed.state), "--rounds", "1", "--out", str(out),
        "--quiet", "--wait-timeout", "120", "--set", "round-retries=0",
        timeout=RUN_TIMEOUT, cwd=hostile,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    mismatch = "is not the app this site installed (sha256 "
    assert metrics["error"].count(mismatch) == 2, metrics["error"]  # both sites said why
    assert "client/app.py differs" in metrics["error"]
    for name in SITES:
        assert "refused: the run's app package (sha256 " in executor_log(fed, name)
        assert "client/app.py differs" in executor_log(fed, name)
    assert not marker.exists()  # not on the sites, not anywhere
