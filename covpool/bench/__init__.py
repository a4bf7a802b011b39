"""``covpool bench``: the backend benchmark (:mod:`covpool.bench.backends`: time and accuracy of every backend,
in units of one batched matrix product) and the model benchmark (:mod:`covpool.bench.models`, ``--models``: what
a second-order head costs in a whole training step).

Both write their tables as CSV files, a plot and a Markdown page headed by a :func:`machine_stamp` line (when,
on what, by which command), which ``covpool bench`` puts in its ``--out`` folder. Every name of the two modules
is importable from here, as when the benchmark was one module.
"""
from ..outputs import moved_names
from ._common import BenchError, machine_stamp
from .backends import (
    FAMILIES,
    RANK_DEFICIENT_NOTE,
    TABLE_COLUMNS,
    Variant,
    default_variants,
    plot,
    product_count,
    run_bench,
    write_backends_page,
)
from .models import (
    HEAD_COLUMNS,
    MODEL_COLUMNS,
    HeadCase,
    ModelCase,
    default_cases,
    format_models_tables,
    head_cases,
    plot_models,
    run_head_bench,
    run_models_bench,
    saved_bytes,
    write_models_page,
)

__all__ = ["Variant", "default_variants", "product_count", "FAMILIES", "run_bench", "TABLE_COLUMNS", "plot",
           "RANK_DEFICIENT_NOTE", "BenchError", "ModelCase", "default_cases", "run_models_bench", "HeadCase",
           "head_cases", "run_head_bench", "saved_bytes", "MODEL_COLUMNS", "HEAD_COLUMNS", "format_models_tables",
           "plot_models", "machine_stamp", "write_backends_page", "write_models_page"]

__getattr__ = moved_names(__name__, {"format_table": ("covpool.bench.backends:_markdown_table",
                                                     "covpool.outputs.format_table(rows, columns, markdown=True)")})
