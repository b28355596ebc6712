"""The benchmarks reach into the library by name: those names must exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_the_functions_convert_bench_wraps_exist():
    """convert_bench times the task phase by wrapping a function of nasar_zarr.execute;
    a rename there silently broke `benchmarks/run.py` once."""
    text = (BENCHMARKS / "convert_bench.py").read_text()
    names = set(re.findall(r"\bex\.(\w+)", text))
    assert names, "convert_bench no longer wraps anything in nasar_zarr.execute"
    execute = importlib.import_module("nasar_zarr.execute")
    assert {n for n in names if not hasattr(execute, n)} == set()
