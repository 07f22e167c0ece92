"""benchmarks/RESULTS.md is generated from benchmarks/RESULTS.template.md and the JSON in benchmarks/results/ by
benchmarks/report.py: a hand edit of it, or a table left stale after a result file changed, fails here."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TEMPLATE = BENCHMARKS / "RESULTS.template.md"
RESULTS = BENCHMARKS / "RESULTS.md"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", BENCHMARKS / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def placeholders(template: Path) -> list[str]:
    return [line for line in template.read_text().split("\n") if line.startswith("<!-- report:")]


def test_results_md_is_the_rendered_template(report):
    rendered = report.render_template(TEMPLATE)
    assert rendered.split("\n")[0] == report.GENERATED_NOTE
    if rendered != RESULTS.read_text():
        pytest.fail("benchmarks/RESULTS.md is not what benchmarks/RESULTS.template.md renders to (hand-edited, or a "
                    "result file changed): edit the template and run `python benchmarks/report.py --write`")


def test_every_placeholder_names_existing_result_files(report):
    lines = placeholders(TEMPLATE)
    assert len(lines) >= 20, "the template lost its placeholders"
    for line in lines:
        assert report.PLACEHOLDER.match(line), f"malformed placeholder: {line}"
        files = report.placeholder_files(line, TEMPLATE.parent)
        assert files, f"placeholder names no file: {line}"
        for f in files:
            assert f.suffix == ".json" and f.is_file(), f"{line} names {f}, which does not exist"
            json.loads(f.read_text())


def test_every_table_is_generated_or_marked_literal(report):
    """A table in the template is text only where a comment says why it is not generated."""
    lines = TEMPLATE.read_text().split("\n")
    for i, line in enumerate(lines):
        if line.startswith("|") and not lines[i - 1].startswith("|"):
            before = [x for x in lines[max(0, i - 5):i] if x.strip()]
            assert any(x.startswith("<!-- not generated:") for x in before), (
                f"template line {i + 1} starts a table typed by hand: make it a placeholder, or mark it "
                f"`<!-- not generated: why -->`")


def copy_tree(tmp_path: Path) -> Path:
    """The template, its result files and the current RESULTS.md, in a scratch benchmarks/ folder."""
    root = tmp_path / "benchmarks"
    shutil.copytree(BENCHMARKS / "results", root / "results")
    shutil.copy(TEMPLATE, root / TEMPLATE.name)
    shutil.copy(RESULTS, root / RESULTS.name)
    return root


def test_a_changed_measurement_makes_results_md_stale(report, tmp_path):
    root = copy_tree(tmp_path)
    path = root / "results" / "compare_cpu_forward_65536x1024x64_float32.json"
    data = json.loads(path.read_text())
    ours = next(r for r in data["rows"] if r["provider"] == "vqvae_fast[cpu]")
    ours["median_s"] = 0.1234  # was 85.9 ms
    path.write_text(json.dumps(data))
    assert report.main(["--check", str(root / TEMPLATE.name)]) == 1
    assert "| vqvae_fast[cpu] | 123.4 |" in report.render_template(root / TEMPLATE.name)


def test_a_hand_edited_number_fails_the_check(report, tmp_path):
    root = copy_tree(tmp_path)
    assert report.main(["--check", str(root / TEMPLATE.name)]) == 0
    text = (root / RESULTS.name).read_text()
    edited = re.sub(r"\| vqvae_fast\[cpu\] \| 85\.9 \|", "| vqvae_fast[cpu] | 75.9 |", text, count=1)
    assert edited != text
    (root / RESULTS.name).write_text(edited)
    assert report.main(["--check", str(root / TEMPLATE.name)]) == 1


def test_a_placeholder_naming_a_missing_file_fails(report, tmp_path):
    root = copy_tree(tmp_path)
    template = root / TEMPLATE.name
    template.write_text(template.read_text() + "\n<!-- report: results/no_such_result.json -->\n")
    with pytest.raises(FileNotFoundError):
        report.render_template(template)
