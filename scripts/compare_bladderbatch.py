#!/usr/bin/env python
"""Batch correction on bladderbatch: none, MetadataResidualizer, CorrelationRemover, ComBat.

The comparison lives in :mod:`metanorm_repro.experiments.bladderbatch`; run it as
``metanorm reproduce bladderbatch`` (report.md and results.json written atomically). This
script keeps the older command line::

    python scripts/compare_bladderbatch.py [--genes 1000] [--folds 5] [--repeats 10]
        [--out runs/bladderbatch.json] [--overwrite] [--data PATH]
"""

from metanorm_repro.experiments.bladderbatch import METHODS, compare, main, to_markdown

__all__ = ["METHODS", "compare", "main", "to_markdown"]

if __name__ == "__main__":
    raise SystemExit(main())
