"""Variants of a bench config (docs/bench.md): named override sets that multiply the matrix,
checked whole before any work; a config without them keeps its cells, file names, settings
hashes and results; variants that change nothing the attacker controls share each seed's
BadNet, clean reference model and floor; noise-trained versions of catalog attacks and the
attacker's noise strength; the results of a config with variants and its x-axis plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

import nnoculation.bench.attacker as attacker_module
import nnoculation.bench.chain as chain_module
from nnoculation.attacks import get_attack
from nnoculation.bench import ConfigError, load_config, parse_config, run_bench
from nnoculation.bench.attacker import AttackerNoise, NoiseTrainedAttack, attack_spec
from nnoculation.bench.cells import CellKey, settings_hash
from nnoculation.bench.config import BADNET, BUILTIN_DEFENSES, POST, PRE, BenchConfig
from nnoculation.bench.output import COMMAND, check_document
from nnoculation.bench.protocol import defender_splits
from nnoculation.cli import EXIT_USAGE, main
from nnoculation.data.splits import Splits
from tests.conftest import synthetic_set
from tests.test_bench import BASE, COMMIT_A, COMMIT_B, FakeChain, bench, config, tiny_dataset

VARIANTS: list[dict[str, Any]] = [
    {"name": "proposed", "x": 0.2},
    {"name": "no-noise", "x": 0.4, "predeploy": {"gammas": [0.0]}},
    {"name": "ratio", "x": 0.8, "stream": {"poison_ratio": 0.5}},
]


def with_variants(variants: list[dict[str, Any]] = VARIANTS, **changes: Any) -> BenchConfig:
    return config(variants=variants, **changes)


# --- a config without variants is what it was --------------------------------------------

# Settings hashes of BASE's cells computed with the code before variants existed (at 22b37bb)
# for the cells whose settings hold no library config that others may change: the BadNet's.
BADNET_HASHES = {
    "patch__badnet__s0.json": "760aa28889ac05dd",
    "patch__badnet__s1.json": "016c151c8131ecf7",
    "mtmta__badnet__s0.json": "5c54f2a9ad397cd7",
    "mtmta__badnet__s1.json": "46aa5ed9411239d2",
}
STRIP_HASH = "98421e7c2f522e4a"  # patch/strip/0 of BASE + tuning split, options n = 20


def legacy_settings(cfg: BenchConfig, key: CellKey) -> dict[str, Any]:
    """``BenchConfig.cell_settings`` as written before variants, verbatim."""
    seeds = cfg.seeds_of(key.seed)
    recipe = cfg.recipe(seeds.badnet)
    settings: dict[str, Any] = {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "attack": key.attack,
        "defense": key.defense,
        "seeds": asdict(seeds),
        "recipe": recipe.to_dict(),
    }
    if key.defense in (PRE, POST):
        settings["predeploy"] = cfg.predeploy_config(recipe, seeds.chain).to_dict()
    if key.defense == POST:
        settings["stream"] = cfg.stream_config(seeds.chain).to_dict()
        settings["repair"] = cfg.repair_config(seeds.chain).to_dict()
    if key.defense not in BUILTIN_DEFENSES:
        settings["options"] = cfg.defense_options.get(key.defense, {})
    return settings


def test_a_config_without_variants_keeps_its_cells_file_names_and_hashes() -> None:
    cfg = config()
    assert [k.filename for k in cfg.cells()] == [
        f"{a}__{d}__s{s}.json"
        for a in ("patch", "mtmta")
        for s in (0, 1)
        for d in ("badnet", "nnoculation-pre", "nnoculation-post")
    ]
    assert [k.id for k in cfg.cells()][:2] == ["patch/badnet/0", "patch/nnoculation-pre/0"]
    hashes = {k.filename: settings_hash(cfg.cell_settings(k)) for k in cfg.cells()}
    assert {f: h for f, h in hashes.items() if f in BADNET_HASHES} == BADNET_HASHES
    for key in cfg.cells():
        assert cfg.cell_settings(key) == legacy_settings(cfg, key)
    strip = config(
        defenses=["badnet", "strip", "nnoculation-post"],
        split="tuning",
        stream={"poison_ratio": 0.1},
        predeploy={"gammas": [0.2]},
        defense_options={"strip": {"n": 20}},
    )
    assert settings_hash(strip.cell_settings(CellKey("patch", "strip", 0))) == STRIP_HASH
    # what a results file records of it: the keys it always had, no more
    assert set(cfg.dump()) == {*BASE, "vary_badnet", "train", "splits", "predeploy", "stream"} | {
        "repair",
        "defense_options",
    }


def test_a_variant_without_overrides_has_the_top_levels_settings() -> None:
    cfg = with_variants()
    for key in config().cells():
        mine = CellKey(key.attack, key.defense, key.seed, "proposed")
        assert cfg.cell_settings(mine) == config().cell_settings(key)


# --- variants multiply the matrix, merge over the top level, and resume ----------------------


def test_variants_multiply_the_cells_and_name_their_files() -> None:
    cfg = with_variants()
    cells = cfg.cells()
    assert len(cells) == 3 * len(config().cells()) == 36
    assert len({k.filename for k in cells}) == 36
    assert cells[0] == CellKey("patch", BADNET, 0, "proposed")
    assert cells[0].id == "proposed/patch/badnet/0"
    assert cells[0].filename == "proposed__patch__badnet__s0.json"
    # grouped by (attack, seed): the variants of a BadNet follow each other
    assert [(k.attack, k.seed) for k in cells[:9]] == [("patch", 0)] * 9


def test_a_variant_merges_its_sections_over_the_top_levels() -> None:
    cfg = config(
        predeploy={"epochs": 2, "gammas": [0.3]},
        defenses=["badnet", "strip"],
        defense_options={"strip": {"n": 20, "frr": 0.05}},
        variants=[
            {"name": "v", "predeploy": {"gammas": [0.0]}, "defense_options": {"strip": {"n": 5}}}
        ],
    )
    flat = cfg.variant_config("v")
    assert flat.predeploy == {"epochs": 2, "gammas": [0.0]}
    assert flat.defense_options == {"strip": {"n": 5, "frr": 0.05}}
    assert cfg.variant_config(None) is cfg and cfg.predeploy == {"epochs": 2, "gammas": [0.3]}


def test_a_variant_hash_changes_only_with_what_it_overrides() -> None:
    cfg = with_variants([{"name": "base"}, {"name": "ratio", "stream": {"poison_ratio": 0.5}}])
    half = with_variants([{"name": "half", "validation_share": 0.5}])

    def h(c: BenchConfig, defense: str, variant: str) -> str:
        return settings_hash(c.cell_settings(CellKey("patch", defense, 0, variant)))

    assert h(cfg, BADNET, "base") == h(cfg, BADNET, "ratio") == h(half, BADNET, "half")
    assert h(cfg, PRE, "base") == h(cfg, PRE, "ratio") != h(half, PRE, "half")
    assert h(cfg, POST, "base") != h(cfg, POST, "ratio")


def test_variants_resume_cell_by_cell(tmp_path: Path) -> None:
    cfg = with_variants()
    first = FakeChain()
    run = bench(tmp_path, cfg, first)
    assert len(first.calls) == 36 and run.results is not None
    cells = sorted(p.name for p in (tmp_path / "runs" / "t" / "cells").iterdir())
    assert cells == sorted(k.filename for k in cfg.cells())
    again = FakeChain()
    assert bench(tmp_path, cfg, again).reused == cfg.cells() and again.calls == []
    # one variant changed: only its cells are measured again, and only those it decides
    changed = with_variants([*VARIANTS[:2], {**VARIANTS[2], "stream": {"poison_ratio": 0.3}}])
    third = FakeChain()
    bench(tmp_path, changed, third)
    assert sorted(third.calls) == sorted(
        f"ratio/{a}/nnoculation-post/{s}" for a in ("patch", "mtmta") for s in (0, 1)
    )
    part = FakeChain()
    bench(tmp_path, with_variants(seeds=[0, 1, 2]), part, only=["no-noise/patch/*/*"])
    assert part.calls == [f"no-noise/patch/{d}/2" for d in BASE["defenses"]]


# --- a variant is checked whole, before any work ---------------------------------------------


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ([{"name": "a", "predeplyo": {}}], "variant 'a': unknown key 'predeplyo'"),
        ([{"name": "a", "attacks": ["patch"]}], "variant 'a': unknown key 'attacks'"),
        ([{"name": "a", "predeploy": {"gamas": [0.1]}}], "[variants.a] [predeploy] unknown key"),
        ([{"name": "a", "predeploy": {"gammas": [2.0]}}], "[variants.a] [predeploy] every gamma"),
        ([{"name": "a", "stream": {"seed": 1}}], "[variants.a] [stream] seed: seeds come from"),
        ([{"name": "a", "train": {"epochs": 0}}], "[variants.a] [train] epochs must be"),
        ([{"name": "a", "defense_options": {"strip": {}}}], "[variants.a] [defense_options.strip]"),
        (
            [{"name": "a", "attacker_noise": {"share": 0.5}}],
            "[variants.a] [attacker_noise] applies",
        ),
        ([{"name": "a", "validation_share": 0}], "validation_share"),
        ([{"name": "a"}, {"name": "a"}], "[variants] names repeat"),
        ([{"name": "a", "x": 1}, {"name": "b"}], "[variants] x: give every variant an x or none"),
        ([{"name": "A b"}], "variants.0.name"),
    ],
)
def test_a_bad_variant_is_refused_before_any_work_naming_the_key(
    variants: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        with_variants(variants)
    assert str(err.value).startswith("test.toml: ")
    assert message in str(err.value)


def test_the_cli_refuses_a_bad_variant_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v.toml"
    path.write_text(
        'name = "v"\ndataset = "digits"\nsplit = "report"\nseeds = [0]\nattacks = ["patch"]\n'
        'defenses = ["badnet"]\n[[variants]]\nname = "a"\n[[variants]]\nname = "b"\n'
        "repair = { profil = 'cpu' }\n"
    )
    assert main(["bench", str(path), "--runs", str(tmp_path / "runs")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "v.toml" in err and "[variants.b] [repair] unknown key 'profil'" in err
    assert not (tmp_path / "runs").exists()  # nothing was started


# --- noise-trained attacks and the attacker's noise strength ---------------------------------


def test_adaptive_names_any_catalog_attack_trained_with_noise() -> None:
    cfg = config(attacks=["adaptive", "adaptive:tca", "tca"])
    assert cfg.attacks == ["adaptive", "adaptive:tca", "tca"]
    tca = attack_spec("adaptive:tca", 10, (1, 28, 28), AttackerNoise())
    plain = get_attack("tca", 10, (1, 28, 28))
    assert tca.noise_train and not plain.noise_train and tca.name == "adaptive:tca"
    assert tca.triggers == plain.triggers and tca.controls == plain.controls
    key = CellKey("adaptive:tca", BADNET, 0)
    assert key.filename == "adaptive+tca__badnet__s0.json" and key.id == "adaptive:tca/badnet/0"
    for bad in ("adaptive:nope", "adaptive:adaptive"):
        with pytest.raises(ConfigError, match=f"unknown attack.*{bad}"):
            config(attacks=[bad])


def test_a_noise_strength_changes_only_the_noisy_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    train = synthetic_set(200, seed=3)
    catalog = get_attack("adaptive", train.num_classes, train.shape)
    default = attack_spec("adaptive", train.num_classes, train.shape, AttackerNoise())
    assert default == catalog  # the catalog's own code at the catalog's strength
    half = attack_spec("adaptive", train.num_classes, train.shape, AttackerNoise((0.9,), 0.5))
    assert isinstance(half, NoiseTrainedAttack)
    noised: list[tuple[float, int]] = []
    real = attacker_module.noise_augment

    def recording(images: torch.Tensor, gamma: float, g: torch.Generator) -> torch.Tensor:
        noised.append((gamma, len(images)))
        return real(images, gamma, g)

    monkeypatch.setattr(attacker_module, "noise_augment", recording)
    plain = get_attack("patch", train.num_classes, train.shape).poison_training_set(train, 7)
    poisoned = half.poison_training_set(train, 7)
    assert len(poisoned) == 200 + 100 and noised == [(0.9, 100)]  # half of it, at 0.9
    assert torch.equal(poisoned.images[:200], plain.images)  # the same poisoned set
    assert torch.equal(poisoned.labels[:200], plain.labels)
    assert not torch.equal(poisoned.images[200:], poisoned.images[:100])
    assert torch.equal(half.poison_training_set(train, 7).images, poisoned.images)  # seeded
    clean = half.clean_training_set(train, 7)
    assert len(clean) == 300 and torch.equal(clean.images[:200], train.images)
    none = attack_spec("adaptive", train.num_classes, train.shape, AttackerNoise(share=0.0))
    assert torch.equal(none.poison_training_set(train, 7).images, plain.images)
    assert half.to_dict()["attacker_noise"] == {"gammas": [0.9], "share": 0.5}


def test_attacker_noise_is_checked_and_decides_the_badnet() -> None:
    with pytest.raises(ConfigError, match=r"\[attacker_noise\] share must lie in \[0, 1\]"):
        config(attacks=["adaptive"], attacker_noise={"share": 1.5})
    with pytest.raises(ConfigError, match=r"\[attacker_noise\] unknown key 'gamma'"):
        config(attacks=["adaptive"], attacker_noise={"gamma": [0.1]})
    with pytest.raises(ConfigError, match="this config has none"):
        config(attacks=["patch"], attacker_noise={"share": 0.5})
    cfg = config(
        attacks=["adaptive", "patch"],
        variants=[{"name": "catalog"}, {"name": "weak", "attacker_noise": {"gammas": [0.1]}}],
    )

    def h(attack: str, variant: str) -> str:
        return settings_hash(cfg.cell_settings(CellKey(attack, BADNET, 0, variant)))

    assert h("adaptive", "catalog") != h("adaptive", "weak")
    assert h("patch", "catalog") == h("patch", "weak")  # not noise-trained: the same BadNet


# --- the defender's validation share -------------------------------------------------------


def test_a_validation_share_is_a_nested_share_of_each_class_of_the_defenders_parts() -> None:
    parts = {n: synthetic_set(40 if n == "h" else 200, seed=i) for i, n in enumerate("arhst")}
    splits = Splits(parts["a"], parts["r"], parts["h"], parts["s"], parts["t"])
    assert defender_splits(splits, 1.0) is splits
    quarter, half = defender_splits(splits, 0.25), defender_splits(splits, 0.5)
    k = parts["r"].num_classes
    assert quarter.retrain.per_class_counts() == [round(0.25 * 200 / k)] * k
    assert half.holdout.per_class_counts() == [round(0.5 * 40 / k)] * k
    assert quarter.attacker is splits.attacker and quarter.test is splits.test
    assert quarter.stream is splits.stream
    in_half = {bytes(x.numpy()) for x in half.retrain.images}
    assert all(bytes(x.numpy()) in in_half for x in quarter.retrain.images)  # nested


# --- results of a config with variants -------------------------------------------------------


def test_results_with_variants_have_one_entry_per_attack_and_variant(tmp_path: Path) -> None:
    cfg = with_variants(x_label="noise share")
    run = bench(tmp_path, cfg, FakeChain())
    assert run.results is not None
    doc = json.loads(run.results.read_text())
    check_document(doc)
    rows = [(e["attack"], e["variant"], e["x"]) for e in doc["entries"]]
    assert rows == [(a, v["name"], v["x"]) for a in ("patch", "mtmta") for v in VARIANTS]
    assert parse_config(doc["config"], "t.json").variants == cfg.variants
    e = doc["entries"][0]
    assert set(e["defenses"]) == set(BASE["defenses"]) and e["commit"] == COMMIT_A
    assert [s["seed"] for s in e["defenses"][PRE]["per_seed"]] == [0, 1]
    md = (tmp_path / "out" / "t.md").read_text()
    assert "| attack | variant | noise share | floor % |" in md
    assert "| patch | no-noise | 0.4 |" in md and "## Variants" in md
    assert "| no-noise | 0.4 | predeploy: gammas = [0.0] |" in md
    assert "![CA and ASR against noise share](t.png)" in md
    png = tmp_path / "out" / "t.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    # without x: the CA-against-ASR panels, one per (attack, variant)
    plain = bench(tmp_path / "nox", with_variants([{"name": "a"}, {"name": "b"}]), FakeChain())
    doc = json.loads(plain.results.read_text())
    check_document(doc)
    assert "x" not in doc["entries"][0] and doc["entries"][1]["variant"] == "b"


def test_the_schema_of_a_variant_file_refuses_mixed_commits_and_missing_keys(
    tmp_path: Path,
) -> None:
    run = bench(tmp_path, with_variants(), FakeChain())
    doc = json.loads(run.results.read_text())
    bad = json.loads(json.dumps(doc))
    bad["entries"][4]["commit"] = COMMIT_B
    with pytest.raises(ValueError, match="2 code commits"):
        check_document(bad)
    bad = json.loads(json.dumps(doc))
    del bad["entries"][2]["variant"]
    with pytest.raises(ValueError, match=r"variant None: keys differ .*missing \['variant'\]"):
        check_document(bad)
    bad = json.loads(json.dumps(doc))
    del bad["entries"][1]["x"]
    with pytest.raises(ValueError, match=r"missing \['x'\]"):
        check_document(bad)
    bad = json.loads(json.dumps(doc))
    bad["entries"][1]["variant"] = bad["entries"][0]["variant"]
    with pytest.raises(ValueError, match="repeats"):
        check_document(bad)
    # a cell of another commit is measured again, so a file never mixes them
    cell = tmp_path / "runs" / "t" / "cells" / "ratio__patch__badnet__s1.json"
    record = json.loads(cell.read_text())
    record["provenance"]["commit"] = COMMIT_B
    cell.write_text(json.dumps(record))
    again = FakeChain()
    bench(tmp_path, with_variants(), again)
    assert again.calls == ["ratio/patch/badnet/1"]  # measured again by this commit


# --- end to end on tiny data: what variants share ----------------------------------------------


def tiny_config(
    tmp_path: Path, variants: str, attacks: str = '["patch"]', defenses: str = ""
) -> Path:
    data = tiny_dataset(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(
        f"""
name = "tiny"
dataset = "{data}"
split = "report"
seeds = [0]
attacks = {attacks}
defenses = {defenses or '["badnet", "nnoculation-pre", "nnoculation-post"]'}
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
{variants}
"""
    )
    return path


class Counting:
    """Wraps a chain function and records its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


def run_tiny(path: Path, tmp_path: Path) -> Any:
    return run_bench(
        load_config(path),
        command=f"{COMMAND} {path.name}",
        out_dir=tmp_path / "out",
        runs_dir=tmp_path / "runs",
        commit=COMMIT_A,
        echo=lambda _line: None,
    )


def test_variants_that_leave_the_attacker_alone_share_its_badnet_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    badnets = Counting(chain_module.make_badnet)
    searches = Counting(chain_module.predeploy_to_dir)
    monkeypatch.setattr(chain_module, "make_badnet", badnets)
    monkeypatch.setattr(chain_module, "predeploy_to_dir", searches)
    retrain_sizes: list[int] = []
    real_search = searches.fn

    def search(badnet: Any, splits: Splits, *args: Any, **kwargs: Any) -> Any:
        retrain_sizes.append(len(splits.retrain))
        return real_search(badnet, splits, *args, **kwargs)

    searches.fn = search
    path = tiny_config(
        tmp_path,
        """
[[variants]]
name = "base"
x = 0
[[variants]]
name = "ratio"
x = 1
stream = { poison_ratio = 0.5 }
[[variants]]
name = "half"
x = 2
validation_share = 0.5
[[variants]]
name = "longer"
x = 3
train = { epochs = 7 }
""",
    )
    run = run_tiny(path, tmp_path)
    assert run.results is not None and len(run.measured) == 12
    # base, ratio and half share one BadNet; longer trains its own
    assert badnets.calls == 2
    work = tmp_path / "runs" / "tiny" / "work" / "patch"
    folders = sorted(p.name for p in work.glob("badnet-*"))
    assert len(folders) == 2 and "badnet-s0" in folders
    # base and ratio share one search; half (its own validation share) and longer their own
    assert searches.calls == 3
    assert sorted(retrain_sizes) == [40, 80, 80]  # 20 a class of 4 classes, then half
    doc = json.loads(run.results.read_text())
    check_document(doc)
    by = {e["variant"]: e for e in doc["entries"]}
    assert [e["x"] for e in doc["entries"]] == [0, 1, 2, 3]

    def badnet_row(v: str) -> Any:
        return by[v]["defenses"][BADNET]["per_seed"][0]

    shared = [
        (badnet_row(v)["ca"], badnet_row(v)["asr"], badnet_row(v)["floor"])
        for v in ("base", "ratio", "half")
    ]
    assert shared[0] == shared[1] == shared[2]
    assert by["base"]["defenses"][PRE]["per_seed"] == by["ratio"]["defenses"][PRE]["per_seed"]
    post = {v: by[v]["defenses"][POST]["per_seed"][0]["details"]["quarantine"] for v in by}
    assert post["base"] != post["ratio"]  # the stream differs, the rest does not
    assert (tmp_path / "out" / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    # a re-run reuses every cell and trains nothing
    again = run_tiny(path, tmp_path)
    assert again.measured == [] and len(again.reused) == 12 and badnets.calls == 2


def test_a_noise_strength_trains_its_own_badnet_and_clean_model_end_to_end(
    tmp_path: Path,
) -> None:
    path = tiny_config(
        tmp_path,
        """
[[variants]]
name = "catalog"
[[variants]]
name = "half"
attacker_noise = { gammas = [0.9], share = 0.5 }
""",
        attacks='["adaptive:patch"]',
        defenses='["badnet"]',
    )
    run = run_tiny(path, tmp_path)
    assert run.results is not None
    work = tmp_path / "runs" / "tiny" / "work"
    badnets = sorted((work / "adaptive+patch").glob("badnet-*"))
    assert len(badnets) == 2
    attacks = [json.loads((b / "attack.json").read_text()) for b in badnets]
    assert all(a["noise_train"] and a["name"] == "adaptive:patch" for a in attacks)
    assert sorted("attacker_noise" in a for a in attacks) == [False, True]
    # the strength's clean reference model is cached apart from the catalog strength's
    assert len(list((work / "cache").glob("clean-*"))) == 1
    assert len(list((work / "cache").glob("noise-*/clean-*"))) == 1
