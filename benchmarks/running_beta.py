"""Running-β policies of MetadataNorm after a SHORT training, on the paper's synthetic task.

The study lives in :mod:`metanorm_repro.experiments.running_beta`; run it as ``metanorm
reproduce running-beta`` (report.md and results.json written atomically). This script keeps
the older command line::

    .venv/bin/python benchmarks/running_beta.py --model mdn-conv            # ~8-10 min, 1 thread
    .venv/bin/python benchmarks/running_beta.py --model mdn-linear --out /tmp/lin.json
"""

from metanorm_repro.experiments.running_beta import main

if __name__ == "__main__":
    main()
