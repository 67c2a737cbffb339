"""``nnoculation bench``: the config is checked whole before any work, seeds thread through the
whole chain, cells resume only when the same code made them, the aggregation (median, worst,
Pareto front, which stage met the target), the one-commit rule of a results file, an end-to-end
run on tiny data, and the schema of every committed results file of the command."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from models.bundle import load_bundle, sha256_file
from nnoculation.bench import ConfigError, load_config, parse_config, run_bench
from nnoculation.bench.aggregate import (
    MixedCommitsError,
    attack_entry,
    entries,
    pareto_front,
)
from nnoculation.bench.cells import CellKey, Measured, is_clean, read_cell, write_json_atomic
from nnoculation.bench.output import COMMAND, check_document, write_outputs
from nnoculation.bench.protocol import chain_seeds, split_source
from nnoculation.cli import EXIT_USAGE, main
from nnoculation.data.sources import DataSource
from nnoculation.defenses import Defended, DefenseInputs, base
from tests.conftest import synthetic_set

ROOT = Path(__file__).resolve().parents[1]
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
BASE: dict[str, Any] = {
    "name": "t",
    "dataset": "digits",
    "attacks": ["patch", "mtmta"],
    "defenses": ["badnet", "nnoculation-pre", "nnoculation-post"],
    "seeds": [0, 1],
    "split": "report",
}


def config(**changes: Any) -> Any:
    return parse_config({**BASE, **changes}, "test.toml")


# --- the config is checked whole, and errors name the key -------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attackz": ["patch"]}, "attackz"),
        ({"attacks": ["patch", "no-such-attack"]}, "no-such-attack"),
        ({"defenses": ["badnet", "nope"]}, "nope"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"seeds": [-1]}, "seeds must lie in"),
        ({"split": "holdout"}, "split"),
        ({"name": "has space"}, "name"),
        ({"repair": {"profil": "cpu"}}, "[repair] unknown key 'profil'"),
        ({"repair": {"seed": 3}}, "[repair] seed: seeds come from"),
        ({"stream": {"poison_ratio": 1.5}}, "[stream] poison_ratio must lie in [0, 1]"),
        ({"predeploy": {"gammas": [2.0]}}, "[predeploy] every gamma must lie in [0, 1]"),
        ({"predeploy": {"alpha0": 0.1}}, "[predeploy] unknown key 'alpha0'"),
        ({"splits": {"seed": 4}}, "[splits] seed"),
        ({"train": {"epochs": 0}}, "[train] epochs must be a positive integer"),
        ({"train": {"lr": "fast"}}, "[train] lr must be a positive number"),
        ({"splits": {"validation_source": "x"}}, "validation_source must be one of"),
        ({"defense_options": {"strip": {"n": 3}}}, "[defense_options.strip] names no"),
    ],
)
def test_a_bad_config_is_refused_before_any_work_naming_the_key(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config(**changes)
    assert str(err.value).startswith("test.toml: ")
    assert message in str(err.value)


def test_defense_options_are_checked_by_the_defense_itself() -> None:
    with pytest.raises(ConfigError, match=r"\[defense_options.strip\].*frr"):
        config(defenses=["badnet", "strip"], defense_options={"strip": {"frr": 2.0}})
    with pytest.raises(ConfigError, match=r"\[defense_options.strip\].*unexpected keyword"):
        config(defenses=["badnet", "strip"], defense_options={"strip": {"nn": 2}})


def test_toml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nattacks = [\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.cells()


def test_the_cli_reports_a_bad_config_as_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "c"\ndataset = "digits"\nattacks = ["patch"]\ndefenses = ["bad"]\n')
    assert main(["bench", str(path), "--runs", str(tmp_path / "runs")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "c.toml" in err and "defenses" in err and "split" in err  # every problem at once


# --- the protocol: tuning vs report, one seed through the whole chain ------------------------


def test_one_seed_reaches_every_stage_of_the_chain() -> None:
    cfg = config()
    seeds = cfg.seeds_of(1)
    recipe = cfg.recipe(seeds.badnet)
    assert recipe.train.seed == seeds.badnet == seeds.chain == 1  # the BadNet varies too
    assert cfg.predeploy_config(recipe, seeds.chain).seed == 1
    assert cfg.stream_config(seeds.chain).seed == 1  # stream order and poisoned subset
    assert cfg.repair_config(seeds.chain).seed == 1  # CycleGAN, domain A draw, fine-tune
    fixed = config(vary_badnet=False).seeds_of(1)
    assert (fixed.chain, fixed.badnet) == (1, 0)


def test_tuning_uses_other_seeds_and_no_test_image_of_the_report() -> None:
    for seed in (0, 5):
        tuned, reported = chain_seeds("tuning", seed, True), chain_seeds("report", seed, True)
        assert tuned.chain != reported.chain and tuned.split != reported.split
    train, test = synthetic_set(300, seed=1), synthetic_set(80, seed=2)
    source = DataSource("s", train, test)
    assert split_source(source, "report") is source
    tuning = split_source(source, "tuning")
    assert tuning.test is not None and len(tuning.test) == len(test)
    pooled = torch.cat([tuning.train.images, tuning.test.images]).flatten(1)
    assert sorted(map(bytes, pooled.numpy())) == sorted(map(bytes, train.images.flatten(1).numpy()))


def test_a_cell_settings_hash_changes_only_with_what_decides_that_cell() -> None:
    cfg, other = config(), config(stream={"poison_ratio": 0.1})
    pre, post = CellKey("patch", "nnoculation-pre", 0), CellKey("patch", "nnoculation-post", 0)
    assert cfg.cell_settings(pre) == other.cell_settings(pre)
    assert cfg.cell_settings(post) != other.cell_settings(post)
    assert cfg.cell_settings(post) != cfg.cell_settings(CellKey("patch", "nnoculation-post", 1))


# --- resume at the cell level ---------------------------------------------------------------


class FakeChain:
    """Figures made up from the key, counting calls: what the runner does around them."""

    def __init__(self, fail_at: int | None = None, models: str = "m1") -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at
        self.models = models  # stands for the digest of the BadNet this chain made

    def __call__(self, key: CellKey) -> Measured:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        self.calls.append(key.id)
        triggers = 3 if key.attack == "mtmta" else 1
        asr = 90.0 if key.defense == "badnet" else 1.0 + key.seed
        return Measured(
            ["t"] * triggers,
            80.0 - key.seed,
            [asr] * triggers,
            [0.5] * triggers,
            1,
            artifacts={"badnet": f"{self.models}-{key.attack}-{key.seed}"},
        )


def bench(tmp_path: Path, cfg: Any, measure: FakeChain, commit: str = COMMIT_A, **kw: Any) -> Any:
    return run_bench(
        cfg,
        command=f"{COMMAND} t.toml",
        out_dir=tmp_path / "out",
        runs_dir=tmp_path / "runs",
        commit=commit,
        measure=measure,
        **{"echo": lambda _line: None, **kw},
    )


def test_a_finished_cell_is_reused_and_one_from_another_commit_is_measured_again(
    tmp_path: Path,
) -> None:
    cfg = config()
    first = FakeChain()
    run = bench(tmp_path, cfg, first)
    assert len(first.calls) == len(cfg.cells()) == 12 and run.results is not None
    again = FakeChain()
    assert bench(tmp_path, cfg, again).reused == cfg.cells() and again.calls == []
    cell = tmp_path / "runs" / "t" / "cells" / CellKey("patch", "badnet", 1).filename
    record = json.loads(cell.read_text())
    record["provenance"]["commit"] = COMMIT_B
    cell.write_text(json.dumps(record))
    third = FakeChain()
    bench(tmp_path, cfg, third)
    assert third.calls == ["patch/badnet/1"]
    assert read_cell(cell)["provenance"]["commit"] == COMMIT_A  # type: ignore[index]


def test_changed_settings_re_run_only_the_cells_they_decide(tmp_path: Path) -> None:
    bench(tmp_path, config(), FakeChain())
    again = FakeChain()
    bench(tmp_path, config(stream={"quarantine_size": 50}), again)
    assert sorted(again.calls) == sorted(
        f"{a}/nnoculation-post/{s}" for a in ("patch", "mtmta") for s in (0, 1)
    )


def test_a_dirty_tree_reuses_nothing(tmp_path: Path) -> None:
    bench(tmp_path, config(), FakeChain(), commit=COMMIT_A + "-dirty")
    again = FakeChain()
    bench(tmp_path, config(), again, commit=COMMIT_A + "-dirty")
    assert len(again.calls) == 12
    assert not is_clean(COMMIT_A + "-dirty") and not is_clean("unknown")


def test_an_interrupted_run_keeps_its_finished_cells(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        bench(tmp_path, config(), FakeChain(fail_at=5))
    cells = tmp_path / "runs" / "t" / "cells"
    assert len(list(cells.glob("*.json"))) == 5
    assert not [p for p in cells.iterdir() if p.suffix != ".json"]  # no half-written file
    rest = FakeChain()
    run = bench(tmp_path, config(), rest)
    assert len(rest.calls) == 7 and run.results is not None


def test_only_cells_measures_a_subset_and_writes_no_results_until_the_plan_is_whole(
    tmp_path: Path,
) -> None:
    part = FakeChain()
    run = bench(tmp_path, config(), part, only=["patch/*/0"])
    assert part.calls == ["patch/badnet/0", "patch/nnoculation-pre/0", "patch/nnoculation-post/0"]
    assert run.results is None and len(run.missing) == 9
    assert not (tmp_path / "out").exists()
    rest = FakeChain()
    assert bench(tmp_path, config(), rest).results is not None and len(rest.calls) == 9
    with pytest.raises(ConfigError, match="selects no cell"):
        bench(tmp_path, config(), FakeChain(), only=["nope/*"])


def test_cells_travel_in_their_own_folder_to_another_machine(tmp_path: Path) -> None:
    carried = tmp_path / "carried"
    first = bench(tmp_path, config(), FakeChain(), only=["patch/*"], cells_dir=carried)
    assert len(list(carried.glob("*.json"))) == 6 and first.results is None
    assert not (tmp_path / "runs" / "t" / "cells").exists()
    other = tmp_path / "other-machine"
    rest = FakeChain()
    run = run_bench(
        config(),
        command=f"{COMMAND} t.toml",
        out_dir=other / "out",
        runs_dir=other / "runs",
        commit=COMMIT_A,
        measure=rest,
        echo=lambda _line: None,
        cells_dir=carried,
    )
    assert sorted(rest.calls) == sorted(c.id for c in config().cells() if c.attack == "mtmta")
    assert len(run.reused) == 6 and run.results is not None


def test_the_cli_hands_cells_and_only_cells_to_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nnoculation.bench as bench_module

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(bench_module, "run_from_file", lambda *args: calls.append(args))
    base = ["bench", "c.toml", "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "r")]
    assert main([*base, "--cells", str(tmp_path / "carried"), "--only-cells", "a/*", "b/*/0"]) == 0
    assert calls[-1] == (
        "c.toml",
        tmp_path / "o",
        tmp_path / "r",
        ["a/*", "b/*/0"],
        tmp_path / "carried",
    )
    assert main(base) == 0  # no --cells: the run keeps its cells under --runs
    assert calls[-1] == ("c.toml", tmp_path / "o", tmp_path / "r", None, None)


def test_a_resumed_cell_measured_on_other_models_is_measured_again(tmp_path: Path) -> None:
    bench(tmp_path, config(), FakeChain(models="m1"), only=["patch/badnet/0", "patch/*/1"])
    # another sitting re-made the BadNets differently: its patch/*/0 cells disagree with the
    # resumed patch/badnet/0, which is measured again; seed 1's group is whole and kept
    lines: list[str] = []
    later = FakeChain(models="m2")
    run = bench(tmp_path, config(), later, echo=lines.append)
    assert run.stale == [CellKey("patch", "badnet", 0)]
    assert later.calls.count("patch/badnet/0") == 1 and "patch/badnet/1" not in later.calls
    assert any("measuring them again" in line for line in lines)
    doc = json.loads(run.results.read_text())  # type: ignore[union-attr]
    assert doc["entries"][0]["defenses"]["badnet"]["per_seed"][0]["seed"] == 0
    cell = read_cell(tmp_path / "runs" / "t" / "cells" / CellKey("patch", "badnet", 0).filename)
    assert cell["artifacts"] == {"badnet": "m2-patch-0"}  # type: ignore[index]


def test_a_stale_cell_outside_the_selection_is_dropped_not_kept(tmp_path: Path) -> None:
    bench(tmp_path, config(), FakeChain(models="m1"), only=["patch/badnet/0"])
    later = FakeChain(models="m2")
    run = bench(tmp_path, config(), later, only=["patch/nnoculation-pre/0"])
    assert later.calls == ["patch/nnoculation-pre/0"] and run.stale == [
        CellKey("patch", "badnet", 0)
    ]
    assert CellKey("patch", "badnet", 0) in run.missing and run.results is None
    assert not (tmp_path / "runs" / "t" / "cells" / CellKey("patch", "badnet", 0).filename).exists()


def test_write_json_atomic_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "c.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]


# --- aggregation ----------------------------------------------------------------------------


def cell(defense: str, seed: int, ca: float, asr: list[float], floor: list[float]) -> dict:
    return {
        "attack": "x",
        "defense": defense,
        "seed": seed,
        "triggers": [f"t{i}" for i in range(len(asr))],
        "ca": ca,
        "asr": asr,
        "floor": floor,
        "seconds": 1.0,
        "details": {},
        "provenance": {"commit": COMMIT_A, "torch": "2", "device": "cpu", "date": f"d{seed}"},
    }


def test_median_and_worst_over_seeds_per_trigger() -> None:
    cas, asrs = [90.0, 86.0, 88.0], [[1.0, 9.0], [5.0, 2.0], [3.0, 4.0]]
    floor = [0.5, 1.0]
    cells = [cell("post", s, cas[s], asrs[s], floor) for s in range(3)]
    d = attack_entry("x", cells, ["post"], [0, 1, 2])["defenses"]["post"]
    assert d["median"] == {"ca": statistics.median(cas), "asr": [3.0, 4.0]}
    assert d["worst"] == {"ca": 86.0, "asr": [5.0, 9.0]}  # lowest CA, highest ASR per trigger
    assert [s["asr"] for s in d["per_seed"]] == asrs


def test_a_single_trigger_attack_reports_numbers_not_lists() -> None:
    cells = [cell("post", s, 90.0, [float(s)], [1.0]) for s in range(3)]
    e = attack_entry("x", cells, ["post"], [0, 1, 2])
    assert e["defenses"]["post"]["median"] == {"ca": 90.0, "asr": 1.0}
    assert e["floor"]["median"] == 1.0 and e["triggers"] == ["t0"]


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = {"a": (90.0, 5.0), "b": (88.0, 1.0), "c": (87.0, 3.0), "d": (90.0, 6.0)}
    assert pareto_front(points) == ["a", "b"]  # c is beaten by b, d by a
    assert pareto_front({"a": (90.0, 5.0), "b": (90.0, 5.0)}) == ["a", "b"]  # ties stay


def test_the_entry_marks_the_front_without_the_badnet_or_oracle_defenses() -> None:
    rows = {"badnet": (95.0, 99.0), "pre": (90.0, 5.0), "post": (89.0, 1.0), "nc": (92.0, 0.5)}
    cells = [cell(d, s, ca, [asr], [0.5]) for d, (ca, asr) in rows.items() for s in (0, 1, 2)]
    e = attack_entry("x", cells, list(rows), [0, 1, 2], oracle=["nc"])
    assert e["pareto"] == ["pre", "post"]
    assert [d for d in rows if e["defenses"][d]["pareto"]] == ["pre", "post"]


def test_the_target_names_the_stage_that_met_it_on_every_seed() -> None:
    floor = [1.0]
    pre = [cell("nnoculation-pre", s, 90.0, [a], floor) for s, a in enumerate([2.0, 3.5, 2.5])]
    post = [cell("nnoculation-post", s, 89.0, [a], floor) for s, a in enumerate([0.0, 1.0, 3.0])]
    t = attack_entry("x", pre + post, ["nnoculation-pre", "nnoculation-post"], [0, 1, 2])["target"]
    assert t["pre-deployment"] == {
        "per_seed": {"0": True, "1": False, "2": True},  # 3.5 > 1.0 + 2
        "median": True,
        "worst": False,
    }
    assert t["repair"]["worst"] is True
    assert (t["met_by"], t["met_by_median"], t["provisional"]) == (
        "repair",
        "pre-deployment",
        False,
    )
    two = attack_entry("x", pre[:2], ["nnoculation-pre"], [0, 1])["target"]
    assert two["met_by"] is None and two["provisional"] is True


def test_cells_of_one_seed_must_agree_on_the_floor() -> None:
    cells = [cell("pre", 0, 90.0, [1.0], [0.5]), cell("post", 0, 90.0, [1.0], [0.7])]
    with pytest.raises(ValueError, match="disagree on the floor"):
        attack_entry("x", cells, ["pre", "post"], [0])


# --- one commit per results file ------------------------------------------------------------


def test_cells_of_one_seed_must_name_the_same_models() -> None:
    cells = [cell("pre", 0, 90.0, [1.0], [0.5]), cell("post", 0, 90.0, [1.0], [0.5])]
    cells[0]["artifacts"] = {"badnet": "d1", "goodnet": "g1"}
    cells[1]["artifacts"] = {"badnet": "d1", "goodnet": "g2"}
    with pytest.raises(ValueError, match=r"different models \(goodnet\)"):
        attack_entry("x", cells, ["pre", "post"], [0])
    cells[1]["artifacts"]["goodnet"] = "g1"
    assert attack_entry("x", cells, ["pre", "post"], [0])["attack"] == "x"


def test_cells_of_two_commits_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    cells = [cell("post", s, 90.0, [1.0], [0.5]) for s in range(3)]
    cells[1]["provenance"]["commit"] = COMMIT_B
    with pytest.raises(MixedCommitsError, match="2 code commits"):
        entries(cells, ["x"], ["post"], [0, 1, 2])
    good = entries(
        [cell("post", s, 90.0, [1.0], [0.5]) for s in range(3)], ["x"], ["post"], [0, 1, 2]
    )
    mixed = [good[0], {**good[0], "attack": "y", "commit": COMMIT_B}]
    cfg = config(attacks=["patch"], defenses=["nnoculation-post"], seeds=[0, 1, 2])
    with pytest.raises(MixedCommitsError):
        write_outputs(cfg, mixed, f"{COMMAND} t.toml", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_document_refuses_a_file_whose_entries_name_two_commits(tmp_path: Path) -> None:
    bench(tmp_path, config(), FakeChain())
    doc = json.loads((tmp_path / "out" / "t.json").read_text())
    check_document(doc)
    doc["entries"][1]["commit"] = COMMIT_B
    with pytest.raises(MixedCommitsError):
        check_document(doc)
    del doc["entries"][1]["commit"]
    with pytest.raises(ValueError, match="missing \\['commit'\\]"):
        check_document({**doc, "entries": doc["entries"][1:]})


def test_the_written_files_carry_provenance_and_the_table(tmp_path: Path) -> None:
    bench(tmp_path, config(), FakeChain())
    doc = json.loads((tmp_path / "out" / "t.json").read_text())
    assert doc["command"] == f"{COMMAND} t.toml" and doc["commit"] == COMMIT_A
    for e in doc["entries"]:
        assert (e["commit"], e["torch"]) == (COMMIT_A, torch.__version__)
        assert e["device"].startswith(("cpu", "cuda")) and e["date"].startswith("20")
    mtmta = doc["entries"][1]["defenses"]["nnoculation-post"]
    assert mtmta["median"]["asr"] == [1.5, 1.5, 1.5]  # a list per trigger
    md = (tmp_path / "out" / "t.md").read_text()
    assert "| patch |" in md and "target met by" in md
    assert "pre-deployment (pre-deployment 2/2, repair 2/2 seeds) provisional" in md
    assert (tmp_path / "out" / "t.png").read_bytes()[:4] == b"\x89PNG"


# --- end to end on tiny data ----------------------------------------------------------------


class Identity:
    """A registry defense that changes nothing, to run the registry path end to end."""

    name: ClassVar[str] = "test-identity"

    def run(self, inputs: DefenseInputs) -> Defended:
        return Defended(self.name, inputs.badnet, 0.0, {"seed": inputs.seed})


def tiny_dataset(tmp_path: Path) -> Path:
    """A tiny ``.npz`` data set with a test split of its own, for end-to-end bench runs."""
    train, test = synthetic_set(600, seed=31), synthetic_set(240, seed=32)
    data = tmp_path / "tiny.npz"
    np.savez(
        data,
        images=train.images.permute(0, 2, 3, 1).numpy(),
        labels=train.labels.numpy(),
        test_images=test.images.permute(0, 2, 3, 1).numpy(),
        test_labels=test.labels.numpy(),
    )
    return data


def test_end_to_end_on_tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base._REGISTRY, Identity.name, Identity)
    data = tiny_dataset(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(
        f"""
name = "tiny"
dataset = "{data}"
split = "report"
seeds = [0, 1]
attacks = ["patch"]
defenses = ["badnet", "nnoculation-pre", "nnoculation-post", "{Identity.name}"]
[train]
epochs = 6
[splits]
validation_per_class = 30
holdout_per_class = 10
[predeploy]
alpha_multiples = [1.0, 3.0]
gammas = [0.3]
epochs = 1
[stream]
quarantine_size = 12
[repair]
profile = "test"
finetune_epochs = 1
domain_a_size = 40
"""
    )
    cfg = load_config(path)
    lines: list[str] = []
    run = run_bench(
        cfg,
        command=f"{COMMAND} {path.name}",
        out_dir=tmp_path / "out",
        runs_dir=tmp_path / "runs",
        commit=COMMIT_A,
        echo=lines.append,
    )
    assert run.results is not None and len(run.measured) == 8
    assert any(line.startswith("[8/8] patch/test-identity/1") and "ETA" in line for line in lines)
    doc = json.loads(run.results.read_text())
    check_document(doc)
    (entry,) = doc["entries"]
    ds = entry["defenses"]
    # the registry defense returned the BadNet itself: the same figures, its seed threaded
    assert [s["ca"] for s in ds["badnet"]["per_seed"]] == [
        s["ca"] for s in ds["test-identity"]["per_seed"]
    ]
    assert [s["details"]["seed"] for s in ds["test-identity"]["per_seed"]] == [0, 1]
    assert all(s["asr"] > s["floor"] + 20 for s in ds["badnet"]["per_seed"])  # a real BadNet
    post = ds["nnoculation-post"]["per_seed"]
    assert all(s["details"]["goodnet"] and s["details"]["quarantine"]["size"] > 0 for s in post)
    # the seed varies the stream, and the BadNet: two of them, with other weights
    assert post[0]["details"]["quarantine"] != post[1]["details"]["quarantine"]
    work = tmp_path / "runs" / "tiny" / "work" / "patch"
    assert sorted(p.name for p in work.glob("badnet-s*")) == ["badnet-s0", "badnet-s1"]
    weights = [
        load_bundle(work / f"badnet-s{s}" / "badnet").net("badnet").module.state_dict()
        for s in (0, 1)
    ]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # every cell names the models it was measured on: its seed's BadNet file, and the GoodNet
    # for the two NNoculation stages
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs/tiny/cells").iterdir()}
    for s in (0, 1):
        expected = sha256_file(work / f"badnet-s{s}" / "badnet" / "badnet.safetensors")
        mine = [c for c in cells.values() if c["seed"] == s]
        assert len(mine) == 4 and {c["artifacts"]["badnet"] for c in mine} == {expected}
        goodnets = {c["artifacts"].get("goodnet") for c in mine if c["defense"].startswith("nn")}
        assert len(goodnets) == 1 and None not in goodnets
    # a re-run reuses every cell
    again = run_bench(
        cfg,
        command=f"{COMMAND} {path.name}",
        out_dir=tmp_path / "out",
        runs_dir=tmp_path / "runs",
        commit=COMMIT_A,
        echo=lines.append,
    )
    assert again.measured == [] and len(again.reused) == 8


# --- committed results of this command ------------------------------------------------------


def bench_results() -> list[Path]:
    found = []
    for path in sorted((ROOT / "docs" / "results").glob("*.json")):
        if str(json.loads(path.read_text()).get("command", "")).startswith(COMMAND):
            found.append(path)
    return found


def test_there_is_a_committed_bench_result_to_check() -> None:
    assert bench_results(), "docs/results holds no file written by `nnoculation bench`"


@pytest.mark.parametrize("path", bench_results(), ids=lambda p: p.name)
def test_committed_bench_results_follow_the_schema_and_name_one_clean_commit(path: Path) -> None:
    doc = json.loads(path.read_text())
    check_document(doc)
    assert is_clean(doc["commit"]), f"{path.name} was made by uncommitted code ({doc['commit']})"
    cfg = parse_config(doc["config"], path.name)
    assert doc["command"].split()[2:3] == [f"configs/{cfg.name}.toml"]
    if cfg.variants:  # one entry per (attack, variant), attack by attack
        rows = [(a, v.name) for a in cfg.attacks for v in cfg.variants]
        assert [(e["attack"], e["variant"]) for e in doc["entries"]] == rows
    else:
        assert [e["attack"] for e in doc["entries"]] == cfg.attacks
    for e in doc["entries"]:
        assert list(e["defenses"]) == cfg.defenses and e["seeds"] == cfg.seeds
