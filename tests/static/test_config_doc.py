"""The READMEs' configuration tables are the ones generated from the settings classes."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest
from diffmesh import config_doc
from diffmesh.cli import main
from diffmesh.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
READMES = [REPO / "README.md", *sorted((REPO / "services").glob("*/README.md"))]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_readme_tables_are_generated(readme: Path) -> None:
    text = readme.read_text()
    assert config_doc.has_blocks(text), f"{readme}: no <!-- config-table:start --> block"
    expected = config_doc.update_markdown(text)
    if expected != text:
        diff = "".join(difflib.unified_diff(text.splitlines(True), expected.splitlines(True), "README", "generated", n=1))
        pytest.fail(f"{readme.relative_to(REPO)}: configuration table is stale; run `make config-doc`\n{diff[:4000]}")


def test_the_top_readme_has_every_table_and_each_service_readme_its_own() -> None:
    assert "<!-- config-table:start -->" in (REPO / "README.md").read_text()
    folders = {"router": "router", "coordinator": "cache-coordinator", "instance-manager": "instance-manager", "worker": "worker"}
    for doc in config_doc.SERVICES:
        text = (REPO / "services" / folders[doc.name] / "README.md").read_text()
        assert f"<!-- config-table:start {doc.name} -->" in text, doc.name


def test_every_setting_is_documented_once_under_its_variable() -> None:
    text = config_doc.markdown()
    for doc in config_doc.SERVICES:
        cls = doc.settings_class()
        for name in config_doc.own_fields(cls):
            variable = config_doc.env_names(cls, name, cls.model_fields[name])[0]
            assert text.count(f"| `{variable}`") == 1, variable
    for name in ServiceSettings.model_fields:
        assert text.count(f"| `{name.upper()}` |") == 1, name
    assert "`DIFFMESH_WORKER_SKELETON_KEYS`" in text
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in text and "DIFFMESH_COORDINATOR_OTEL" not in text


def test_aliases_are_documented_as_pydantic_settings_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffmesh_coordinator.settings import CoordinatorSettings

    row = next(r for r in config_doc.rows(CoordinatorSettings) if "REDIS_URL" in r[0])
    assert row[0] == "`DIFFMESH_COORDINATOR_REDIS_URL` (falls back to `REDIS_URL`)"
    monkeypatch.setenv("REDIS_URL", "redis://fallback:1/0")
    assert CoordinatorSettings().redis_url == "redis://fallback:1/0"
    monkeypatch.setenv("DIFFMESH_COORDINATOR_REDIS_URL", "redis://preferred:2/0")
    assert CoordinatorSettings().redis_url == "redis://preferred:2/0"


@pytest.mark.parametrize(
    ("service", "field"),
    [("router", "coordinator"), ("coordinator", "catalog"), ("instance-manager", "ssd_dir"),
     ("worker", "instance_manager"), ("worker", "host")],
)
def test_documented_variables_are_the_ones_read(service: str, field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = config_doc.service(service).settings_class()
    [variable] = config_doc.env_names(cls, field, cls.model_fields[field])
    assert f"| `{variable}` |" in config_doc.markdown() or field in ServiceSettings.model_fields
    monkeypatch.setenv(variable, "doc-check:1")
    assert getattr(cls(), field) == "doc-check:1"


def test_computed_defaults_are_described_not_evaluated() -> None:
    text = config_doc.markdown()
    assert "| `DIFFMESH_IM_NODE_ID` | host name |" in text
    assert "| `DIFFMESH_WORKER_NODE_ID` | host name |" in text


def test_cli_prints_checks_and_updates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == config_doc.markdown()
    assert main(["config", "--service", "worker"]) == 0
    assert capsys.readouterr().out == config_doc.service_markdown("worker")
    stale = tmp_path / "README.md"
    stale.write_text("# x\n\n<!-- config-table:start router -->\nold\n<!-- config-table:end -->\n")
    assert main(["config", "--check", str(stale)]) == 1
    assert "make config-doc" in capsys.readouterr().err
    assert main(["config", "--update", str(stale)]) == 0
    assert config_doc.service_markdown("router") in stale.read_text()
    assert main(["config", "--check", str(stale)]) == 0


def test_generation_needs_no_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from diffmesh import config_doc\n"
        "assert config_doc.markdown()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
