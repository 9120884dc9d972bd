"""The drop-in's documented examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

from mlflow import MlflowClient

from tests.conftest import REPO_ROOT
from tests.dropin.conftest import ff_sync, run_script


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_drop_in_example_logs_offline_and_syncs(tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Unmodified MLflow code", 1)[1].split("\n## ", 1)[0]
    (code,) = python_blocks(section)
    spool, db = tmp_path / "spool", tmp_path / "out.db"
    run_script(code, tmp_path, f"spool://{spool}")
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists()
    ff_sync(spool, db)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("dropin-demo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "train-mlp" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.01", "hidden": "64"}
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(20))


def test_the_demo_training_script_is_plain_mlflow() -> None:
    text = (REPO_ROOT / "tools" / "demo_mlflow_train.py").read_text(encoding="utf-8")
    assert "formula_foundry" not in text.split('"""', 2)[2]
