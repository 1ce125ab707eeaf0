"""The README's commands and code are executed, so they stay true."""

import re
from pathlib import Path

import yaml
from conftest import TINY

README = (Path(__file__).parent.parent / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    test_command = _blocks("bash")[1].strip()
    assert test_command in ci


def test_python_api_snippet_runs(tmp_path, demo_root, monkeypatch, capsys):
    nested: dict = {}
    for key, value in TINY.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(nested))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_data").symlink_to(demo_root)
    exec(_blocks("python")[0], {})
    assert "[" in capsys.readouterr().out
    assert (tmp_path / "runs" / "grass" / "model.safetensors").is_file()
