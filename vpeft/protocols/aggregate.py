"""Paper-style tables from result cards: the few-shot, base-to-new and cross-dataset tables of CLIP few-shot papers.

Every training or evaluation run writes ``result_card_<stage>.json`` (:class:`vpeft.modules.callbacks.ResultCard`).
:func:`collect_cards` turns the cards under some folders into flat records; :func:`few_shot_table`,
:func:`base_to_new_table` and :func:`cross_dataset_table` arrange them as in the papers; :func:`render` writes a
table as Markdown, CSV or JSON; :func:`main` is ``vpeft aggregate``::

    vpeft aggregate runs/ --table few_shot --metric test/acc
    vpeft aggregate runs/b2n --table base_to_new --format csv --out b2n.csv
    vpeft aggregate runs/xd --table cross_dataset --source imagenet

Conventions (those of CoOp, arXiv 2109.01134; CoCoOp, arXiv 2203.05557; MaPLe, arXiv 2210.03117; PromptSRC,
arXiv 2307.06948):

* A cell is the mean over seeds ± the *sample* standard deviation (``ddof=1``, what papers reporting "mean ± std over
  3 seeds" compute); one seed shows no ±. The number of seeds is kept in every cell (``n``) and shown in Markdown.
* The seed of a record is the protocol seed, the data module's ``seed`` (it draws the few-shot subset; in CoOp's
  scripts the same number also seeds training).
* Base-to-new: HM is the harmonic mean of the *seed-averaged* base and new accuracies, and the "Average over datasets"
  block's HM is the harmonic mean of the dataset-averaged base and new accuracies (CoCoOp's and MaPLe's tables), not
  the mean of per-seed or per-dataset HMs.
* Averages over datasets average the per-dataset means, only over the datasets every row of the block has; the
  datasets left out are listed in the table's notes.
* Metrics whose values all lie in [0, 1] (and are not losses) are shown in percent; the whole table uses one scale.

Card fields read (missing ones give ``None``): ``config["data"]`` ``dataset``/``shots``/``seed``/``subsample``
(``card["seed"]["data_seed"]`` when the config has no seed), ``card["backbone"]`` (else
``config["model"]["backbone"]``), ``card["methods"]`` (else ``config["model"]["methods"]``), ``card["metrics"]``, and
two optional fields:

* ``label``: ``card["label"]`` or ``config["label"]`` overrides the method label (e.g. ``"vpt_deep"``: both VPT
  variants are the method ``"vpt"``).
* ``source_dataset``: ``card["source_dataset"]`` or ``config["model"]["source_dataset"]``, the dataset a model was
  trained on when the card evaluates it on another one (cross-dataset transfer, domain generalisation). A source equal
  to the card's dataset is no transfer and reads as ``None``.

A card with empty ``methods`` is ``"zero_shot"`` when ``card["zero_shot"]`` or ``config["model"]["zero_shot"]`` is
true, else ``"linear_probe"``. Records with ``shots == 0`` (training-free) appear in every shots block of their
backbone, as the zero-shot reference of the papers.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import statistics
import sys
import warnings
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

from .cards import IDENTITY, CardRecords, PathLike, _describe, _int_or_none, collect_cards  # noqa: F401

#: Column order of the papers (CoOp's 11 datasets as CoCoOp/MaPLe order them, then ImageNet's shifted test sets);
#: other datasets follow alphabetically.
PAPER_ORDER = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
               "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_v2", "imagenet_sketch", "imagenet_a",
               "imagenet_r")
#: Row order: the training-free reference rows first, then alphabetical.
_FIRST_ROWS = ("zero_shot", "linear_probe")
TABLES = ("few_shot", "base_to_new", "cross_dataset")
FORMATS = ("md", "csv", "json")



# -- tables --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    """One table entry.

    Attributes:
        mean: Mean over seeds (or the derived value: an average over datasets, an HM), in the table's unit.
        std: Sample standard deviation over seeds (``ddof=1``); ``None`` for one seed and for derived values.
        n: Number of seeds behind ``mean``; ``None`` for derived values.
    """

    mean: Optional[float]
    std: Optional[float] = None
    n: Optional[int] = None


@dataclasses.dataclass
class Row:
    """A table row: its label (a method) and its cells by column name (missing columns have no entry)."""

    label: str
    cells: dict[str, Cell]


@dataclasses.dataclass
class Block:
    """One sub-table (e.g. one shot count), as a paper prints several side by side.

    Attributes:
        title: Heading, e.g. ``"16 shots · open_clip:ViT-B-16/openai"``.
        meta: What identifies the block (``shots``, ``backbone``, ``dataset`` or ``source``); CSV columns.
        columns: Column names in order.
        rows: The rows.
    """

    title: str
    meta: dict[str, Any]
    columns: list[str]
    rows: list[Row]


@dataclasses.dataclass
class Table:
    """A table: blocks plus the notes that say what was left out and why.

    Attributes:
        kind: ``"few_shot"``, ``"base_to_new"`` or ``"cross_dataset"``.
        metric: The card metric tabulated.
        percent: Whether values were multiplied by 100.
        title: Heading.
        blocks: The sub-tables.
        notes: Exclusions and missing data, one sentence each.
    """

    kind: str
    metric: str
    percent: bool
    title: str
    blocks: list[Block]
    notes: list[str]


def harmonic_mean(base: float, new: float) -> float:
    """``2 * base * new / (base + new)`` (0 when both are 0), the base-to-new HM."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def seed_stats(values: Sequence[float]) -> Cell:
    """Mean and sample standard deviation (``ddof=1``) of per-seed values; one value has no std."""
    values = [float(v) for v in values]
    return Cell(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def few_shot_table(records: Sequence[dict], metric: str = "test/acc", percent: Optional[bool] = None) -> Table:
    """CoOp's few-shot table: one block per shot count (and backbone), rows = methods, columns = datasets + Average.

    Uses the records evaluated on all classes (``subsample`` ``"all"`` or unknown) of the dataset they were trained
    on. A cell is the mean ± sample std (``ddof=1``) over seeds of ``metric``; ``Average`` is the mean of the row's
    per-dataset means over the datasets every row of the block has (the others are named in the notes).

    Args:
        records: From :func:`collect_cards`.
        metric: Card metric, e.g. ``"test/acc"`` or ``"test/top1"``.
        percent: Show values times 100; ``None`` decides from the values (all in [0, 1] and not a loss).

    Raises:
        ValueError: If no record has ``metric`` (the message lists the metrics there are) or none fits the table.
    """
    _check_metric(records, [metric])
    notes: list[str] = []
    usable = []
    for r in records:
        if r["subsample"] not in ("all", None):
            continue
        if _transfer(r):
            continue
        v = _value(r, metric, notes)
        if v is not None:
            usable.append((r, v))
    _note_left_out(records, [r for r, _ in usable], notes, "few-shot", "base/new subsets or transfer evaluations")
    if not usable:
        raise ValueError(f"no record with {metric!r} evaluated on all classes of its own training dataset")
    scale = _scale(metric, [v for _, v in usable], percent)
    blocks = []
    for (backbone, shots), group in _shot_blocks((r["backbone"], r["shots"], (r, v)) for r, v in usable):
        per: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r, v in group:
            per[(r["method"], r["dataset"])].append(v * scale)
        methods = _order_rows({m for m, _ in per})
        datasets = _order_datasets({d for _, d in per})
        rows = [Row(m, {d: seed_stats(per[(m, d)]) for d in datasets if (m, d) in per}) for m in methods]
        title = _block_title(shots, backbone)
        _add_average(rows, datasets, "Average", title, notes)
        blocks.append(Block(title, {"shots": shots, "backbone": backbone}, [*datasets, "Average"], rows))
    unit = " (%)" if scale == 100 else ""
    return Table("few_shot", metric, scale == 100,
                 f"Few-shot {metric}{unit}: mean ± sample std over seeds", blocks, notes)


def base_to_new_table(records: Sequence[dict], metric: str = "test/acc", percent: Optional[bool] = None) -> Table:
    """CoCoOp's base-to-new table: per shot count (and backbone), an "Average over datasets" block then one block per
    dataset; rows = methods, columns = Base, New, HM.

    Base and new accuracies come either from two cards of the same run (``subsample`` ``"base"`` and ``"new"``, equal
    dataset, method, shots, seed and backbone; each gives ``metric``) or from one card holding ``<metric>_base`` and
    ``<metric>_new`` (e.g. ``test/acc_base``). Only seeds with both are used (unpaired ones are noted), so Base and
    New average the same seeds.

    HM follows the papers: ``HM = 2 B N / (B + N)`` of the *seed-averaged* Base and New, not the mean of per-seed
    HMs; the "Average over datasets" block averages the per-dataset Base and New means over the datasets every row
    has and takes the HM of those two averages.

    Args:
        records: From :func:`collect_cards`.
        metric: Card metric (``"test/acc"``: base/new cards' ``test/acc`` or one card's ``test/acc_base``/``_new``).
        percent: Show values times 100; ``None`` decides from the values.

    Raises:
        ValueError: If no record has the metric, none pairs up, or a run has both a base/new pair of cards and a
            card with both metrics (one run counted twice).
    """
    _check_metric(records, [metric, f"{metric}_base", f"{metric}_new"])
    notes: list[str] = []
    halves: dict[tuple, dict[str, tuple[float, str]]] = defaultdict(dict)  # run -> {"base"|"new": (value, path)}
    both: dict[tuple, tuple[float, float, str]] = {}
    used = []
    for r in records:
        if _transfer(r):
            continue
        key = (r["backbone"], r["shots"], r["dataset"], r["method"], r["seed"])
        b, n = _number(r["metrics"].get(f"{metric}_base")), _number(r["metrics"].get(f"{metric}_new"))
        if b is not None and n is not None:
            if key in both:
                raise ValueError(f"run {_run_text(key)} has two cards with {metric}_base and {metric}_new: "
                                 f"{both[key][2]} and {r['path']}")
            both[key] = (b, n, r["path"])
            used.append(r)
        elif r["subsample"] in ("base", "new"):
            v = _value(r, metric, notes)
            if v is not None:
                halves[key][r["subsample"]] = (v, r["path"])
                used.append(r)
    _note_left_out(records, used, notes, "base-to-new", "neither a base/new subset nor both base and new metrics")
    pairs: dict[tuple, tuple[float, float]] = {}
    for key, (b, n, _) in both.items():
        pairs[key] = (b, n)
    for key, h in halves.items():
        if key in both:
            paths = sorted({both[key][2], *(p for _, p in h.values())})
            raise ValueError(f"run {_run_text(key)} has base/new from both a combined card and subset cards: "
                             f"{', '.join(paths)}; keep one kind")
        if "base" in h and "new" in h:
            pairs[key] = (h["base"][0], h["new"][0])
        else:
            have, miss = ("base", "new") if "base" in h else ("new", "base")
            notes.append(f"{_run_text(key)}: {have} without {miss} ({h[have][1]}); not used")
    if not pairs:
        raise ValueError(f"no base/new pair for {metric!r}: give cards with subsample 'base' and 'new' of the same "
                         f"run, or cards with {metric}_base and {metric}_new")
    scale = _scale(metric, [x for bn in pairs.values() for x in bn], percent)
    blocks = []
    for (backbone, shots), group in _shot_blocks((k[0], k[1], (k, bn)) for k, bn in pairs.items()):
        per: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for key, (b, n) in group:
            per[(key[3], key[2])].append((b * scale, n * scale))
        methods = _order_rows({m for m, _ in per})
        datasets = _order_datasets({d for _, d in per})
        title = _block_title(shots, backbone)
        means = {k: (statistics.fmean(b for b, _ in v), statistics.fmean(n for _, n in v)) for k, v in per.items()}
        common = [d for d in datasets if all((m, d) in per for m in methods)]
        _note_incomplete(methods, datasets, common, set(per), title, "Average over datasets", notes)
        avg_rows = []
        for m in methods:
            if common:
                b = statistics.fmean(means[(m, d)][0] for d in common)
                n = statistics.fmean(means[(m, d)][1] for d in common)
                avg_rows.append(Row(m, {"Base": Cell(b), "New": Cell(n), "HM": Cell(harmonic_mean(b, n))}))
            else:
                avg_rows.append(Row(m, {}))
        columns = ["Base", "New", "HM"]
        blocks.append(Block(f"Average over {len(common)} dataset(s) · {title}",
                            {"shots": shots, "backbone": backbone, "dataset": "Average"}, columns, avg_rows))
        for d in datasets:
            rows = []
            for m in methods:
                if (m, d) not in per:
                    continue
                b, n = seed_stats([x for x, _ in per[(m, d)]]), seed_stats([y for _, y in per[(m, d)]])
                rows.append(Row(m, {"Base": b, "New": n, "HM": Cell(harmonic_mean(b.mean, n.mean))}))
            blocks.append(Block(f"{d} · {title}", {"shots": shots, "backbone": backbone, "dataset": d}, columns, rows))
    unit = " (%)" if scale == 100 else ""
    return Table("base_to_new", metric, scale == 100,
                 f"Base-to-new {metric}{unit}: mean ± sample std over seeds; HM of the averaged Base and New",
                 blocks, notes)


def cross_dataset_table(records: Sequence[dict], source: str = "imagenet", metric: str = "test/acc",
                        percent: Optional[bool] = None) -> Table:
    """CoCoOp's cross-dataset (and domain-generalisation) table: rows = methods, columns = the source dataset, each
    target dataset, and "Average" over the targets (the source excluded).

    A record counts for this table when its ``source_dataset`` is ``source`` (an evaluation of a source-trained model
    on ``dataset``), when it evaluates on ``source`` itself with no ``source_dataset`` (the in-domain column), or when
    it is training-free (method ``zero_shot`` or 0 shots) and evaluates on the source or a target. The targets are the
    datasets of the first kind. For ImageNet -> ``imagenetv2``/``imagenet_sketch``/``imagenet_a``/``imagenet_r`` this
    is the domain-generalisation table.

    Args:
        records: From :func:`collect_cards`.
        source: The training dataset.
        metric: Card metric.
        percent: Show values times 100; ``None`` decides from the values.

    Raises:
        ValueError: If no record has the metric, or none was trained on ``source`` and evaluated elsewhere.
    """
    _check_metric(records, [metric])
    notes: list[str] = []
    targets = {r["dataset"] for r in records if r["source_dataset"] == source and r["dataset"] != source}
    if not targets:
        sources = sorted({str(r["source_dataset"]) for r in records if r["source_dataset"] is not None})
        raise ValueError(f"no record evaluates a model trained on {source!r} on another dataset (cards need "
                         f"'source_dataset': {source!r}); sources in these cards: {sources or 'none'}")
    usable = []
    for r in records:
        if r["subsample"] not in ("all", None):
            continue
        free = r["method"] == "zero_shot" or r["shots"] == 0
        if not (r["source_dataset"] == source
                or (r["source_dataset"] is None and r["dataset"] == source)
                or (free and r["source_dataset"] is None and r["dataset"] in targets)):
            continue
        v = _value(r, metric, notes)
        if v is not None:
            usable.append((r, v))
    _note_left_out(records, [r for r, _ in usable], notes, "cross-dataset", f"not a transfer from {source!r}")
    scale = _scale(metric, [v for _, v in usable], percent)
    blocks = []
    target_cols = _order_datasets(targets)
    for (backbone, shots), group in _shot_blocks((r["backbone"], r["shots"], (r, v)) for r, v in usable):
        per: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r, v in group:
            per[(r["method"], r["dataset"])].append(v * scale)
        methods = _order_rows({m for m, _ in per})
        targets_here = [d for d in target_cols if any((m, d) in per for m in methods)]
        columns = [source, *targets_here]
        rows = [Row(m, {d: seed_stats(per[(m, d)]) for d in columns if (m, d) in per}) for m in methods]
        title = _block_title(shots, backbone)
        _add_average(rows, targets_here, "Average", title, notes)
        blocks.append(Block(title, {"shots": shots, "backbone": backbone, "source": source},
                            [*columns, "Average"], rows))
    unit = " (%)" if scale == 100 else ""
    return Table("cross_dataset", metric, scale == 100,
                 f"Cross-dataset transfer from {source} — {metric}{unit}: mean ± sample std over seeds; "
                 "Average over the targets", blocks, notes)


# -- table helpers -------------------------------------------------------------------------------------------------
def available_metrics(records: Sequence[dict]) -> list[str]:
    """The sorted metric names that occur in ``records``."""
    return sorted({k for r in records for k in r["metrics"]})


def _check_metric(records: Sequence[dict], names: Sequence[str]) -> None:
    if not records:
        raise ValueError("no records (no result cards were found or all were skipped)")
    if not any(n in r["metrics"] for r in records for n in names):
        raise ValueError(f"unknown metric {names[0]!r}; the cards have: {', '.join(available_metrics(records))}")


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _value(r: dict, metric: str, notes: list[str]) -> Optional[float]:
    if metric not in r["metrics"]:
        notes.append(f"{r['path']}: no {metric!r}; not used")
        return None
    v = _number(r["metrics"][metric])
    if v is None:
        notes.append(f"{r['path']}: {metric!r} is {r['metrics'][metric]!r}, not a finite number; not used")
    return v


def _transfer(r: dict) -> bool:
    return r["source_dataset"] is not None


def _note_left_out(records: Sequence[dict], used: Sequence[dict], notes: list[str], table: str, why: str) -> None:
    ids = {id(r) for r in used}
    left = [r["path"] for r in records if id(r) not in ids and not any(n.startswith(f"{r['path']}: ") for n in notes)]
    if left:
        notes.append(f"{len(left)} card(s) not in the {table} table ({why}): {', '.join(left)}")


def _scale(metric: str, values: Sequence[float], percent: Optional[bool]) -> float:
    if percent is None:
        percent = "loss" not in metric.lower() and all(0.0 <= v <= 1.0 for v in values)
    return 100.0 if percent else 1.0


def _shot_blocks(items: Iterable[tuple[Any, Any, Any]]) -> list[tuple[tuple[Any, Any], list]]:
    """Group ``(backbone, shots, payload)`` by (backbone, shots), sorted; 0-shot payloads join every shots block of
    their backbone (and form their own block only when their backbone has no other)."""
    groups: dict[tuple, list] = defaultdict(list)
    for backbone, shots, payload in items:
        groups[(backbone, shots)].append(payload)
    out: dict[tuple, list] = {}
    for (backbone, shots), group in groups.items():
        others = [k for k in groups if k[0] == backbone and k[1] != 0]
        for k in (others if shots == 0 and others else [(backbone, shots)]):
            out.setdefault(k, []).extend(group)
    return sorted(out.items(), key=lambda kv: (_sort_key(kv[0][0]), _sort_key(kv[0][1])))


def _sort_key(x: Any) -> tuple:
    return (x is None, str(type(x).__name__), x if x is not None else 0)


def _order_rows(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=lambda m: (_FIRST_ROWS.index(m) if m in _FIRST_ROWS else len(_FIRST_ROWS), m))


def _order_datasets(datasets: Iterable[str]) -> list[str]:
    return sorted(datasets, key=lambda d: (PAPER_ORDER.index(d) if d in PAPER_ORDER else len(PAPER_ORDER), d))


def _block_title(shots: Any, backbone: Any) -> str:
    k = "? shots" if shots is None else f"{shots} shot" + ("" if shots == 1 else "s")
    return f"{k} · {backbone if backbone is not None else 'unknown backbone'}"


def _add_average(rows: list[Row], datasets: list[str], column: str, title: str, notes: list[str]) -> None:
    common = [d for d in datasets if all(d in row.cells for row in rows)]
    has = {(r.label, d) for r in rows for d in r.cells}
    _note_incomplete([r.label for r in rows], datasets, common, has, title, column, notes)
    if common:
        for row in rows:
            row.cells[column] = Cell(statistics.fmean(row.cells[d].mean for d in common))


def _note_incomplete(methods: Sequence[str], datasets: Sequence[str], common: Sequence[str], has: set[tuple[str, str]],
                     title: str, column: str, notes: list[str]) -> None:
    left = [d for d in datasets if d not in common]
    if not left:
        return
    missing = "; ".join(f"{d} (missing for {', '.join(m for m in methods if (m, d) not in has)})" for d in left)
    what = f"over {', '.join(common)}" if common else "left empty: no dataset is present for every row"
    notes.append(f"[{title}] {column} {what}; left out: {missing}")


def _run_text(key: tuple) -> str:
    backbone, shots, dataset, method, seed = key
    return f"{method} on {dataset} ({shots} shots, seed {seed}, {backbone})"


# -- rendering -----------------------------------------------------------------------------------------------------
def render(table: Table, fmt: str = "md") -> str:
    """The table as text.

    Args:
        table: From one of the ``*_table`` functions.
        fmt: ``"md"`` (Markdown like the papers: 2 decimals, ``mean ± std``, a Seeds column, notes below),
            ``"csv"`` (one line per cell: the block's meta fields, ``row, column, mean, std, n_seeds``; full
            precision; no notes) or ``"json"`` (the whole :class:`Table`, notes included).

    Raises:
        ValueError: For an unknown ``fmt``.
    """
    if fmt == "md":
        return _markdown(table)
    if fmt == "csv":
        return _csv(table)
    if fmt == "json":
        return json.dumps(dataclasses.asdict(table), indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def _fmt(x: float, percent: bool) -> str:
    return f"{x:.2f}" if percent else f"{x:.4g}"


def _md_cell(cell: Optional[Cell], percent: bool, row_n: Optional[int]) -> str:
    if cell is None or cell.mean is None:
        return "–"
    text = _fmt(cell.mean, percent)
    if cell.std is not None:
        text += f" ± {_fmt(cell.std, percent)}"
    if cell.n is not None and cell.n != row_n:
        text += f" (n={cell.n})"
    return text


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _markdown(table: Table) -> str:
    out = [f"## {table.title}", ""]
    for block in table.blocks:
        out += [f"### {block.title}", "", "| Method | " + " | ".join(map(_md_escape, block.columns)) + " | Seeds |",
                "|---|" + "---:|" * (len(block.columns) + 1)]
        for row in block.rows:
            ns = sorted({c.n for c in row.cells.values() if c.n is not None})
            seeds = "–" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
            cells = [_md_cell(row.cells.get(c), table.percent, ns[-1] if ns else None) for c in block.columns]
            out.append(f"| {_md_escape(row.label)} | " + " | ".join(cells) + f" | {seeds} |")
        out.append("")
    if table.notes:
        out += ["Notes:", ""] + [f"- {n}" for n in table.notes] + [""]
    return "\n".join(out)


def _csv(table: Table) -> str:
    keys: list[str] = []
    for block in table.blocks:
        keys += [k for k in block.meta if k not in keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*keys, "row", "column", "mean", "std", "n_seeds"])
    for block in table.blocks:
        for row in block.rows:
            for col in block.columns:
                c = row.cells.get(col)
                if c is None:
                    continue
                w.writerow([*("" if block.meta.get(k) is None else block.meta[k] for k in keys), row.label, col,
                            "" if c.mean is None else repr(c.mean), "" if c.std is None else repr(c.std),
                            "" if c.n is None else c.n])
    return buf.getvalue()


# -- command line --------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``vpeft aggregate RUNS... [--stage] [--metric] [--table] [--source] [--format] [--out]``.

    Prints the table (and, with ``--out``, also writes it atomically); skipped cards and the notes of a CSV table go
    to stderr. Returns 0, or 2 with a message on stderr for user errors (no cards, unknown metric, ...).
    """
    parser = argparse.ArgumentParser(
        prog="vpeft aggregate",
        description="Turn result cards (result_card_<stage>.json) into the tables of CLIP few-shot papers: "
                    "mean ± sample std over seeds, averages over datasets, base-to-new HM of the averaged accuracies.")
    parser.add_argument("runs", nargs="+", metavar="RUNS", help="run folders (searched recursively) or card files")
    parser.add_argument("--stage", default="test", help="which cards: result_card_<stage>.json (default: test)")
    parser.add_argument("--metric", default="test/acc", help="card metric to tabulate (default: test/acc)")
    parser.add_argument("--table", choices=TABLES, default="few_shot", help="table layout (default: few_shot)")
    parser.add_argument("--source", default="imagenet",
                        help="training dataset of --table cross_dataset (cards' source_dataset; default: imagenet)")
    parser.add_argument("--format", choices=FORMATS, default="md", dest="fmt", help="output format (default: md)")
    parser.add_argument("--out", help="also write the table to this file (atomically)")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped cards are printed below, one a line
            records = collect_cards(args.runs, stage=args.stage)
        for path, why in records.skipped:
            print(f"vpeft aggregate: skipped {path}: {why}", file=sys.stderr)
        if not records:
            raise ValueError(f"no usable result_card_{args.stage}.json under {', '.join(args.runs)}")
        if args.table == "few_shot":
            table = few_shot_table(records, args.metric)
        elif args.table == "base_to_new":
            table = base_to_new_table(records, args.metric)
        else:
            table = cross_dataset_table(records, args.source, args.metric)
    except (ValueError, FileNotFoundError) as e:
        print(f"vpeft aggregate: error: {e}", file=sys.stderr)
        return 2
    text = render(table, args.fmt)
    if args.fmt == "csv":
        for note in table.notes:
            print(f"vpeft aggregate: note: {note}", file=sys.stderr)
    sys.stdout.write(text)
    if args.out:
        from vpeft._fileio import atomic_write

        atomic_write(args.out, lambda f: f.write(text), binary=False)
        print(f"vpeft aggregate: written to {args.out}", file=sys.stderr)
    return 0
