"""The shipped files stay true: node.yaml documents every setting and loads; the notebook runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mycellm.config import ModelSettings, NodeSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_node_yaml_loads_and_documents_every_setting() -> None:
    path = ROOT / "configs" / "node.yaml"
    settings = load_settings(path)
    assert settings.port == 8420
    text = path.read_text()
    for name in [*NodeSettings.model_fields, *ModelSettings.model_fields]:
        assert f"{name}:" in text, f"configs/node.yaml does not mention {name}"


def test_cluster_yaml_is_a_ray_cluster_file() -> None:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cluster["cluster_name"] == "mycellm"
    assert any("mycellm serve" in command for command in cluster["head_start_ray_commands"])


@pytest.mark.node
def test_quickstart_notebook_runs_against_a_node(node, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    monkeypatch.setenv("MYCELLM_URL", node.url)
    namespace: dict[str, object] = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert namespace["models"] == ["SmolLM2-135M-Instruct"]
    assert namespace["streamed"]
    similarity = namespace["similarity"]
    assert similarity[0][0] == pytest.approx(1.0, abs=1e-3)
    assert namespace["status"]["requests"]["requests"] >= 2
