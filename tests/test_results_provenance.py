"""Result files name the one code commit that made them: every committed file in docs/results
(except the few listed in its README as made before the rule, which must really name none),
and what the shared writer does when a run resumes a file or is handed another commit's entry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from nnoculation.benchmarks.common import is_clean, load_entries, write_results

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
A, B = "a" * 40, "b" * 40


def commits(value: Any) -> set[str]:
    """Every ``commit`` value anywhere in a JSON document."""
    if isinstance(value, dict):
        found = {str(v) for k, v in value.items() if k == "commit"}
        return found.union(*(commits(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(commits(v) for v in value))
    return set()


def legacy() -> set[str]:
    """The files the index lists under "Made before entries named their commit"."""
    text = (RESULTS / "README.md").read_text()
    section = text.split("## Made before entries named their commit", 1)[1]
    return set(re.findall(r"^\| ([\w.-]+\.json) \|", section, flags=re.M))


def test_the_index_lists_only_files_that_exist_and_name_no_commit() -> None:
    for name in legacy():
        path = RESULTS / name
        assert path.exists(), f"{name} is listed in docs/results/README.md but is not there"
        assert not commits(json.loads(path.read_text())), (
            f"{name} names a commit now: remove it from the index's list"
        )


def stamped() -> list[Path]:
    """The result files under the rule (all but the index's list, checked above)."""
    return [p for p in sorted(RESULTS.glob("*.json")) if p.name not in legacy()]


@pytest.mark.parametrize("path", stamped(), ids=lambda p: p.name)
def test_every_result_file_names_one_clean_commit(path: Path) -> None:
    found = commits(json.loads(path.read_text()))
    assert len(found) == 1, f"{path.name} names {sorted(found) or 'no'} commits, not one"
    assert is_clean(found.pop()), f"{path.name} was made by uncommitted code"


def test_write_results_stamps_the_file_and_its_entries_and_refuses_other_code(
    tmp_path: Path,
) -> None:
    write_results(tmp_path, "x", [{"name": "n"}, {"name": "m", "commit": A}], "# x", "cmd", code=A)
    doc = json.loads((tmp_path / "x.json").read_text())
    assert doc["commit"] == A and [e["commit"] for e in doc["entries"]] == [A, A]
    assert f"at {A[:12]}" in (tmp_path / "x.md").read_text()
    with pytest.raises(ValueError, match="entries of other code"):
        write_results(tmp_path, "x", [{"name": "n", "commit": B}], "# x", "cmd", code=A)
    assert json.loads((tmp_path / "x.json").read_text()) == doc  # nothing was written


def test_a_resumed_file_keeps_only_entries_of_the_same_clean_commit(tmp_path: Path) -> None:
    entries = [{"name": "old", "commit": B}, {"name": "same", "commit": A}, {"name": "legacy"}]
    (tmp_path / "x.json").write_text(json.dumps({"entries": entries}))
    assert load_entries(tmp_path / "x.json", A) == [{"name": "same", "commit": A}]
    assert load_entries(tmp_path / "x.json", A + "-dirty") == []  # uncommitted code reuses none
    assert load_entries(tmp_path / "missing.json", A) == []
