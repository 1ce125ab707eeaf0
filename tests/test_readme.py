"""The README's commands and code are executed, so they stay true."""

import re
from pathlib import Path

import yaml
from tiny import TINY

from rayad.artifact import Predictor
from rayad.evaluate import evaluate

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
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    predictor = Predictor.load(tmp_path / "runs" / "grass")  # the snippet's model, scored again here
    preds, errors = predictor.predict_files([tmp_path / "demo_data/grass/test/crack/000.png"])
    assert errors == [None]
    assert printed == f"{preds.scores} {preds.labels} {evaluate(predictor, demo_root, 'grass')['image_auroc']}"


def test_references_to_a_docs_section_name_one_that_exists():
    """`docs/design.md, "Section"` in code and docs names a heading of that file (or the start of one)."""
    root = Path(__file__).parent.parent
    headings = {doc: [line.lstrip("#").strip() for line in (root / "docs" / doc).read_text().splitlines()
                      if line.startswith("#")] for doc in ("design.md", "benchmarks.md")}
    files = [root / "README.md", *(root / "docs").glob("*.md"),
             *[p for folder in ("rayad", "dashboard", "serve", "benchmarks") for p in (root / folder).rglob("*.py")]]
    references = [(path.name, doc, section) for path in files
                  for doc, section in re.findall(r'(design\.md|benchmarks\.md), "([^"]+)"', path.read_text())]
    assert len(references) > 10
    missing = [ref for ref in references if not any(h.startswith(ref[2]) for h in headings[ref[1]])]
    assert not missing, f"references to sections that do not exist: {missing}"
