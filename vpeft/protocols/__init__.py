"""Evaluation protocols on top of the training runs: aggregation of result cards into paper-style tables."""

from .aggregate import (
    Block,
    CardRecords,
    Cell,
    Row,
    Table,
    available_metrics,
    base_to_new_table,
    collect_cards,
    cross_dataset_table,
    few_shot_table,
    harmonic_mean,
    main,
    render,
    seed_stats,
)

__all__ = ["Block", "CardRecords", "Cell", "Row", "Table", "available_metrics", "base_to_new_table", "collect_cards",
           "cross_dataset_table", "few_shot_table", "harmonic_mean", "main", "render", "seed_stats"]
