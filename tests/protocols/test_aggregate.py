"""``vpeft aggregate``: result cards of the real shape written to tmp_path, tables checked against numbers computed by
hand (mean ± sample std, HM of averaged base/new, averages over common datasets), and the CLI end to end."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Optional

import pytest

from vpeft.protocols import (
    base_to_new_table,
    collect_cards,
    cross_dataset_table,
    few_shot_table,
    harmonic_mean,
    main,
    render,
)

LORA = {"method": "lora", "r": 8, "alpha": None, "dropout": 0.0, "targets": ["q", "v"], "layers": None}
SSF = {"method": "ssf", "targets": None}
COOP = {"method": "coop", "n_ctx": 16}
CLIP = "open_clip:ViT-B-16/openai"


def make_card(dataset: str, acc: Optional[float], *, methods: Any = (COOP,), shots: Optional[int] = 16, seed: int = 1,
              subsample: str = "all", backbone: str = CLIP, stage: str = "test", metrics: Optional[dict] = None,
              **extra: Any) -> dict:
    """A card shaped like ``ResultCard.card()`` from a CLI run (config = the full LightningCLI config)."""
    data = {"dataset": dataset, "root": "data", "shots": shots, "seed": seed, "subsample": subsample,
            "batch_size": 32, "num_workers": 4, "backbone": backbone, "augment": True, "on_short": "error"}
    if shots is None:
        del data["shots"]
    model = {"backbone": backbone, "pretrained": True, "trainable_extra": [], "init_seed": seed,
             "methods": [{"class_path": f"vpeft.{m['method']}", "init_args": {}} for m in methods or ()]}
    if metrics is None:
        metrics = {"test/acc": acc, "test/loss": 1.234}
    card = {
        "stage": stage, "vpeft_version": "0.1.0", "config_hash": "0" * 64,
        "config": {"data": data, "model": model, "seed_everything": seed, "trainer": {"max_epochs": 50}},
        "git": {"commit": "abc", "dirty": False},
        "seed": {"global": str(seed), "init_seed": seed, "data_seed": seed},
        "manifest": {"hash": "f" * 64, "path": f"manifests/{dataset}_{subsample}_{shots}shot_seed{seed}.json"},
        "backbone": backbone, "methods": [dict(m) for m in methods] if methods is not None else None,
        "metrics": metrics, "params": {"trainable": 8192, "total": 150_000_000},
        "peak_memory": {"cpu_max_rss_bytes": 1}, "throughput": {"wall_s": 1.0},
        "epochs": 50, "global_step": 100, "world_size": 1, "device": "cpu", "precision": "32-true",
        "checkpoints": {"dir": None, "last": None, "best": None, "best_score": None}, "ckpt_path": None,
    }
    card.update(extra)
    return card


def write_card(root, name: str, card: dict, stage: str = "test") -> str:
    folder = os.path.join(root, name, "lightning_logs", "version_0")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"result_card_{stage}.json")
    with open(path, "w") as f:
        json.dump(card, f, indent=2, sort_keys=True)
    return path


def write_few_shot_runs(root) -> None:
    for seed, acc in zip((1, 2, 3), (0.70, 0.72, 0.74)):
        write_card(root, f"coop_caltech_s{seed}", make_card("caltech101", acc, seed=seed))
    write_card(root, "coop_dtd_s1", make_card("dtd", 0.50))
    for seed, acc in zip((1, 2), (0.60, 0.62)):
        write_card(root, f"lp_caltech_s{seed}", make_card("caltech101", acc, methods=[], seed=seed))


def cells(table, block: int = 0) -> dict:
    return {r.label: r.cells for r in table.blocks[block].rows}


# -- collecting ------------------------------------------------------------------------------------------------------
def test_collect_reads_fields_and_labels(tmp_path):
    write_card(tmp_path, "a", make_card("caltech101", 0.7, methods=[LORA, SSF], shots=4, seed=2))
    write_card(tmp_path, "b", make_card("dtd", 0.5, methods=[]))
    write_card(tmp_path, "c", make_card("dtd", 0.6, methods=[], zero_shot=True, shots=0))
    write_card(tmp_path, "d", make_card("eurosat", 0.6, methods=[LORA], label="lora_r8"))
    card = make_card("food101", 0.6, methods=None)  # no card methods: the CLI config's class_path names the method
    card["config"]["model"]["methods"] = [{"class_path": "vpeft.methods.lora.LoraConfig", "init_args": {"r": 8}}]
    write_card(tmp_path, "e", card)
    # another stage, not searched for "test"
    write_card(tmp_path, "f", make_card("dtd", 0.6, shots=None, stage="validate"), stage="validate")
    recs = collect_cards(tmp_path)
    assert not recs.skipped
    by = {r["dataset"] + "/" + r["method"]: r for r in recs}
    assert set(by) == {"caltech101/lora+ssf", "dtd/linear_probe", "dtd/zero_shot", "eurosat/lora_r8", "food101/lora"}
    r = by["caltech101/lora+ssf"]
    assert (r["backbone"], r["shots"], r["seed"], r["subsample"], r["source_dataset"]) == (CLIP, 4, 2, "all", None)
    assert r["metrics"]["test/acc"] == 0.7 and r["path"].endswith(os.path.join("a", "lightning_logs", "version_0",
                                                                                  "result_card_test.json"))
    assert collect_cards(tmp_path, stage="validate")[0]["shots"] is None  # a missing field is None


def test_skipped_cards_are_reported(tmp_path):
    write_card(tmp_path, "good", make_card("dtd", 0.5))
    bad_json = write_card(tmp_path, "bad_json", {})
    with open(bad_json, "w") as f:
        f.write("{not json")
    no_metrics = write_card(tmp_path, "no_metrics", make_card("dtd", 0.5, seed=2, metrics={}))
    card = make_card("dtd", 0.5, seed=3)
    del card["config"]["data"]["dataset"]
    no_dataset = write_card(tmp_path, "no_dataset", card)
    wrong_stage = write_card(tmp_path, "wrong_stage", make_card("dtd", 0.5, seed=4, stage="fit"))
    not_object = write_card(tmp_path, "list", [1, 2])
    with pytest.warns(UserWarning, match="skipped 5 result card"):
        recs = collect_cards([tmp_path])
    assert [r["seed"] for r in recs] == [1]
    reasons = dict(recs.skipped)
    assert set(reasons) == {bad_json, no_metrics, no_dataset, wrong_stage, not_object}
    assert "not valid JSON" in reasons[bad_json] and reasons[no_metrics] == "no metrics"
    assert "no dataset" in reasons[no_dataset] and "stage 'fit'" in reasons[wrong_stage]
    assert "not a JSON object" in reasons[not_object]


def test_duplicate_runs_raise_with_both_paths(tmp_path):
    a = write_card(tmp_path, "run1", make_card("dtd", 0.5))
    b = write_card(tmp_path, "run1_again", make_card("dtd", 0.52))
    with pytest.raises(ValueError, match="same run") as e:
        collect_cards(tmp_path)
    assert a in str(e.value) and b in str(e.value)
    assert len(collect_cards([tmp_path / "run1", a])) == 1  # the same file reached twice is one card


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_cards(tmp_path / "nope")


# -- few-shot --------------------------------------------------------------------------------------------------------
def test_few_shot_mean_sample_std_and_average(tmp_path):
    write_few_shot_runs(tmp_path)
    t = few_shot_table(collect_cards(tmp_path))
    assert t.percent and len(t.blocks) == 1
    b = t.blocks[0]
    assert b.columns == ["caltech101", "dtd", "Average"] and b.meta == {"shots": 16, "backbone": CLIP}
    c = cells(t)
    assert list(c) == ["linear_probe", "coop"]  # reference rows first
    assert c["coop"]["caltech101"].mean == pytest.approx(72.0)
    assert c["coop"]["caltech101"].std == pytest.approx(2.0)  # sample std: sqrt((4 + 0 + 4) / 2)
    assert c["coop"]["caltech101"].n == 3
    assert c["coop"]["dtd"].std is None and c["coop"]["dtd"].n == 1
    assert c["linear_probe"]["caltech101"].std == pytest.approx(2 ** 0.5)
    # dtd is missing for linear_probe: the Average is over caltech101 only, and the notes say so
    assert c["coop"]["Average"].mean == pytest.approx(72.0)
    assert c["linear_probe"]["Average"].mean == pytest.approx(61.0)
    assert any("dtd (missing for linear_probe)" in n for n in t.notes)

    md = render(t, "md")
    assert "| Method | caltech101 | dtd | Average | Seeds |" in md
    assert "| coop | 72.00 ± 2.00 | 50.00 (n=1) | 72.00 | 1–3 |" in md
    assert "| linear_probe | 61.00 ± 1.41 | – | 61.00 | 2 |" in md
    assert "### 16 shots · open_clip:ViT-B-16/openai" in md and "Notes:" in md


def test_few_shot_average_over_all_common_datasets(tmp_path):
    write_card(tmp_path, "a", make_card("caltech101", 0.9))
    write_card(tmp_path, "b", make_card("dtd", 0.5))
    t = few_shot_table(collect_cards(tmp_path))
    assert cells(t)["coop"]["Average"].mean == pytest.approx(70.0) and not t.notes


def test_few_shot_blocks_per_shots_with_zero_shot_reference(tmp_path):
    for k, acc in ((1, 0.5), (16, 0.7)):
        write_card(tmp_path, f"coop{k}", make_card("dtd", acc, shots=k))
    write_card(tmp_path, "zs", make_card("dtd", 0.4, methods=[], zero_shot=True, shots=0))
    base = make_card("dtd", 0.9, subsample="base")
    write_card(tmp_path, "b2n", base)  # a base-to-new card does not belong in the few-shot table
    t = few_shot_table(collect_cards(tmp_path))
    assert [b.meta["shots"] for b in t.blocks] == [1, 16]
    assert [list(cells(t, i)) for i in (0, 1)] == [["zero_shot", "coop"]] * 2
    assert cells(t, 0)["zero_shot"]["dtd"].mean == pytest.approx(40.0)
    assert any("1 card(s) not in the few-shot table" in n for n in t.notes)


def test_unknown_metric_lists_available(tmp_path):
    write_card(tmp_path, "a", make_card("dtd", 0.5))
    with pytest.raises(ValueError, match=r"unknown metric 'test/top1'.*test/acc, test/loss"):
        few_shot_table(collect_cards(tmp_path), metric="test/top1")
    t = few_shot_table(collect_cards(tmp_path), metric="test/loss")  # a loss stays in its own unit
    assert not t.percent and cells(t)["coop"]["dtd"].mean == pytest.approx(1.234)


# -- base-to-new -----------------------------------------------------------------------------------------------------
def test_harmonic_mean_by_hand():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4) == pytest.approx(0.685714, abs=1e-6)
    assert harmonic_mean(0.0, 0.0) == 0.0


def write_b2n_runs(root) -> None:
    # caltech101: base 0.9/0.7 (mean 0.8), new 0.3/0.9 (mean 0.6): HM of the means 68.57; mean of per-seed HMs
    # would be (45.00 + 78.75) / 2 = 61.88.
    for seed, b, n in ((1, 0.9, 0.3), (2, 0.7, 0.9)):
        write_card(root, f"cal_base_s{seed}", make_card("caltech101", b, seed=seed, subsample="base"))
        write_card(root, f"cal_new_s{seed}", make_card("caltech101", n, seed=seed, subsample="new"))
    # dtd: one card with both metrics (base 0.6, new 0.4)
    write_card(root, "dtd_s1", make_card("dtd", None, metrics={"test/acc_base": 0.6, "test/acc_new": 0.4,
                                                               "test/hm": 0.48}))


def test_base_to_new_hm_of_averaged_accuracies(tmp_path):
    write_b2n_runs(tmp_path)
    t = base_to_new_table(collect_cards(tmp_path))
    titles = [b.meta["dataset"] for b in t.blocks]
    assert titles == ["Average", "caltech101", "dtd"]
    cal = cells(t, 1)["coop"]
    assert cal["Base"].mean == pytest.approx(80.0) and cal["New"].mean == pytest.approx(60.0)
    assert cal["Base"].std == pytest.approx(((10 ** 2 + 10 ** 2) / 1) ** 0.5) and cal["Base"].n == 2
    assert cal["HM"].mean == pytest.approx(68.5714, abs=1e-4)
    assert cells(t, 2)["coop"]["HM"].mean == pytest.approx(48.0)
    # average over datasets: base (80 + 60) / 2 = 70, new (60 + 40) / 2 = 50, HM 2*70*50/120 = 58.33 (the mean of the
    # per-dataset HMs would be 58.29)
    avg = cells(t, 0)["coop"]
    assert (avg["Base"].mean, avg["New"].mean) == (pytest.approx(70.0), pytest.approx(50.0))
    assert avg["HM"].mean == pytest.approx(58.3333, abs=1e-4)
    md = render(t, "md")
    assert "| coop | 80.00 ± 14.14 | 60.00 ± 42.43 | 68.57 | 2 |" in md
    assert "| coop | 70.00 | 50.00 | 58.33 | – |" in md
    assert "### Average over 2 dataset(s) · 16 shots · open_clip:ViT-B-16/openai" in md


def test_base_to_new_unpaired_and_conflicting(tmp_path):
    write_card(tmp_path, "b1", make_card("dtd", 0.8, subsample="base"))
    write_card(tmp_path, "n1", make_card("dtd", 0.6, subsample="new"))
    lone = write_card(tmp_path, "b2", make_card("dtd", 0.9, seed=2, subsample="base"))
    t = base_to_new_table(collect_cards(tmp_path))
    assert cells(t, 1)["coop"]["Base"].n == 1 and cells(t, 1)["coop"]["HM"].mean == pytest.approx(68.5714, abs=1e-4)
    assert any(lone in n and "base without new" in n for n in t.notes)
    write_card(tmp_path, "both", make_card("dtd", None, metrics={"test/acc_base": 0.8, "test/acc_new": 0.6}))
    with pytest.raises(ValueError, match="both a combined card and subset cards"):
        base_to_new_table(collect_cards(tmp_path))


# -- cross-dataset ---------------------------------------------------------------------------------------------------
def write_xd_runs(root) -> None:
    for seed, acc in ((1, 0.70), (2, 0.72)):
        write_card(root, f"in_s{seed}", make_card("imagenet", acc, seed=seed))
    write_card(root, "cal", make_card("caltech101", 0.90, source_dataset="imagenet"))  # field on the card
    dtd = make_card("dtd", 0.40)
    dtd["config"]["model"]["source_dataset"] = "imagenet"  # or in the model config
    write_card(root, "dtd", dtd)
    write_card(root, "own_dtd", make_card("dtd", 0.66))  # coop trained on dtd itself: not a transfer
    for d, acc in (("imagenet", 0.66), ("caltech101", 0.85), ("dtd", 0.44)):
        write_card(root, f"zs_{d}", make_card(d, acc, methods=[], zero_shot=True, shots=0))


def test_cross_dataset_table(tmp_path):
    write_xd_runs(tmp_path)
    t = cross_dataset_table(collect_cards(tmp_path), source="imagenet")
    b = t.blocks[0]
    assert b.columns == ["imagenet", "caltech101", "dtd", "Average"] and b.meta["source"] == "imagenet"
    c = cells(t)
    assert c["coop"]["imagenet"].mean == pytest.approx(71.0) and c["coop"]["imagenet"].n == 2
    assert c["coop"]["dtd"].mean == pytest.approx(40.0)  # the transfer, not the dtd-trained run (66)
    assert c["coop"]["Average"].mean == pytest.approx(65.0)  # over targets only: (90 + 40) / 2
    assert c["zero_shot"]["Average"].mean == pytest.approx(64.5)
    assert any("own_dtd" in n for n in t.notes)
    with pytest.raises(ValueError, match="no record evaluates a model trained on 'sun397'"):
        cross_dataset_table(collect_cards(tmp_path), source="sun397")


# -- rendering -------------------------------------------------------------------------------------------------------
def test_csv_and_json_parse_back(tmp_path):
    write_few_shot_runs(tmp_path)
    t = few_shot_table(collect_cards(tmp_path))
    rows = list(csv.DictReader(io.StringIO(render(t, "csv"))))
    assert list(rows[0]) == ["shots", "backbone", "row", "column", "mean", "std", "n_seeds"]
    got = {(r["row"], r["column"]): r for r in rows}
    assert float(got[("coop", "caltech101")]["mean"]) == pytest.approx(72.0)
    assert float(got[("coop", "caltech101")]["std"]) == pytest.approx(2.0)
    assert got[("coop", "caltech101")]["n_seeds"] == "3" and got[("coop", "caltech101")]["shots"] == "16"
    assert got[("coop", "dtd")]["std"] == "" and got[("coop", "Average")]["n_seeds"] == ""
    assert ("linear_probe", "dtd") not in got
    j = json.loads(render(t, "json"))
    assert j["kind"] == "few_shot" and j["notes"] == t.notes
    assert j["blocks"][0]["rows"][1]["cells"]["caltech101"]["mean"] == pytest.approx(72.0)
    with pytest.raises(ValueError, match="unknown format"):
        render(t, "html")


# -- command line ----------------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_few_shot_runs(runs)
    assert main([str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| coop | 72.00 ± 2.00 | 50.00 (n=1) | 72.00 | 1–3 |" in out

    out_file = tmp_path / "tables" / "fs.csv"
    assert main([str(runs), "--format", "csv", "--out", str(out_file)]) == 0
    printed = capsys.readouterr()
    assert out_file.read_text() == printed.out and "note:" in printed.err
    assert not [f for f in os.listdir(out_file.parent) if f != "fs.csv"]  # no temporary file left behind

    b2n = tmp_path / "b2n"
    write_b2n_runs(b2n)
    assert main([str(b2n), "--table", "base_to_new"]) == 0
    assert "| coop | 70.00 | 50.00 | 58.33 | – |" in capsys.readouterr().out

    xd = tmp_path / "xd"
    write_xd_runs(xd)
    assert main([str(xd), "--table", "cross_dataset", "--source", "imagenet", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "cross_dataset"


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no usable result_card_test.json" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    write_card(tmp_path / "runs", "a", make_card("dtd", 0.5))
    with open(write_card(tmp_path / "runs", "broken", {}), "w") as f:
        f.write("[")
    assert main([str(tmp_path / "runs"), "--metric", "test/top1"]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "broken" in err
    assert "unknown metric 'test/top1'; the cards have: test/acc, test/loss" in err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--table", "nope"])
