"""Result cards -> flat records (one per run): the input of the paper-style tables in :mod:`vpeft.protocols.aggregate`.

See :mod:`vpeft.protocols.aggregate` for the card fields read and the conventions.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

#: Fields that identify a run: two records agreeing on all of them are the same run counted twice.
IDENTITY = ("dataset", "method", "shots", "seed", "subsample", "backbone", "source_dataset")

PathLike = Union[str, os.PathLike]


# -- records -------------------------------------------------------------------------------------------------------
class CardRecords(list):
    """The records :func:`collect_cards` returns (a plain ``list`` of dicts) and the cards it skipped.

    Attributes:
        skipped: ``(path, reason)`` for every card that could not become a record.
    """

    def __init__(self, records: Iterable[dict] = (), skipped: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(records)
        self.skipped: list[tuple[str, str]] = list(skipped)


def collect_cards(paths_or_dirs: Union[PathLike, Sequence[PathLike]], stage: str = "test") -> CardRecords:
    """Read the result cards under ``paths_or_dirs`` into flat records.

    Folders are searched recursively for ``result_card_<stage>.json``; a file given explicitly is read whatever its
    name. Each card becomes ``{"dataset", "method", "backbone", "shots", "seed", "subsample", "source_dataset",
    "metrics", "path"}`` (see the module docstring for where each comes from; missing fields are ``None``).

    Cards that cannot be read, are not JSON objects, are of another stage, or have no metrics or no dataset or no
    method information are skipped: they are listed in the result's ``skipped`` attribute and one warning names
    them all. The same file reached twice (a folder and a file inside it) is read once.

    Args:
        paths_or_dirs: Card files and/or folders.
        stage: The stage whose cards to read (``"test"``, ``"validate"``, ``"fit"``).

    Returns:
        A :class:`CardRecords` list, sorted by path.

    Raises:
        FileNotFoundError: If a path does not exist.
        ValueError: If two cards describe the same run (equal ``dataset, method, shots, seed, subsample, backbone,
            source_dataset``): the message names both paths. Averaging them would silently count one run twice.
    """
    if isinstance(paths_or_dirs, (str, os.PathLike)):
        paths_or_dirs = [paths_or_dirs]
    name = f"result_card_{stage}.json"
    files: dict[str, str] = {}
    for p in paths_or_dirs:
        p = os.fspath(p)
        if os.path.isfile(p):
            files.setdefault(os.path.realpath(p), p)
        elif os.path.isdir(p):
            for folder, dirs, names in os.walk(p):
                dirs.sort()
                if name in names:
                    f = os.path.join(folder, name)
                    files.setdefault(os.path.realpath(f), f)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    records, skipped = [], []
    for path in sorted(files.values()):
        try:
            records.append(_card_record(_read_json(path), path, stage))
        except _Skip as e:
            skipped.append((path, str(e)))
    seen: dict[tuple, str] = {}
    for r in records:
        key = tuple(r[k] for k in IDENTITY)
        if key in seen:
            raise ValueError(f"two result cards describe the same run ({_describe(r)}): {seen[key]} and {r['path']}; "
                             "remove one, or tell them apart with a 'label' in the card or its config")
        seen[key] = r["path"]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} result card(s): " + "; ".join(f"{p} ({why})" for p, why in skipped),
                      stacklevel=2)
    return CardRecords(records, skipped)


class _Skip(Exception):
    """A card that cannot become a record (the message says why)."""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise _Skip(f"unreadable: {e}") from None
    except json.JSONDecodeError as e:
        raise _Skip(f"not valid JSON: {e}") from None


def _card_record(card: Any, path: str = "<card>", stage: Optional[str] = None) -> dict[str, Any]:
    """One card as a flat record; raises :class:`_Skip` (reported by :func:`collect_cards`) when it cannot be one."""
    if not isinstance(card, dict):
        raise _Skip(f"not a JSON object but {type(card).__name__}")
    if stage is not None and card.get("stage") not in (None, stage):
        raise _Skip(f"stage {card.get('stage')!r}, not {stage!r}")
    metrics = card.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise _Skip("no metrics")
    config = _dict(card.get("config"))
    data, model = _dict(config.get("data")), _dict(config.get("model"))
    dataset = data.get("dataset", card.get("dataset"))
    if dataset is None:
        raise _Skip("no dataset (config['data']['dataset'] is missing)")
    method = card.get("label", config.get("label"))
    if method is None:
        method = _method_label(card, model)
    source = card.get("source_dataset", model.get("source_dataset"))
    seed = data.get("seed")
    if seed is None:
        seed = _dict(card.get("seed")).get("data_seed")
    return {
        "dataset": str(dataset),
        "method": str(method),
        "backbone": card.get("backbone") or model.get("backbone"),
        "shots": _int_or_none(data.get("shots")),
        "seed": _int_or_none(seed),
        "subsample": data.get("subsample"),
        "source_dataset": None if source == dataset else source,  # trained and tested on one dataset: no transfer
        "metrics": dict(metrics),
        "path": path,
    }


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _int_or_none(x: Any) -> Any:
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return x


def _method_label(card: dict, model: dict) -> str:
    methods = card.get("methods")
    if methods is None:
        methods = model.get("methods")
    if methods is None:
        raise _Skip("no method information (card['methods'] and config['model']['methods'] are missing; "
                    "add a 'label')")
    if not isinstance(methods, list):
        raise _Skip(f"card['methods'] is not a list: {methods!r}")
    if not methods:
        return "zero_shot" if card.get("zero_shot") or model.get("zero_shot") else "linear_probe"
    names = []
    for m in methods:
        if isinstance(m, dict) and m.get("method"):
            names.append(str(m["method"]))
        elif isinstance(m, dict) and m.get("class_path"):  # a CLI config entry: map the config class to its method
            cls = str(m["class_path"]).rsplit(".", 1)[-1]
            names.append(_config_class_names().get(cls, cls))
        else:
            raise _Skip(f"unrecognised method entry {m!r}")
    return "+".join(names)


def _config_class_names() -> dict[str, str]:
    import vpeft

    return {vpeft.get_method(n).config_class.__name__: n for n in vpeft.list_methods()}


def _describe(r: dict) -> str:
    return ", ".join(f"{k}={r.get(k)!r}" for k in IDENTITY if r.get(k) is not None)


