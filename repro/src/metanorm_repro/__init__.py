"""metanorm-repro: the reproduction harness of metanorm.

It reproduces Lu et al., "Metadata Normalization" (CVPR 2021), and runs the project's studies.

The paper's experiments and the project's studies as registered entries, run by one command,
``metanorm reproduce NAME`` (this package adds the ``reproduce`` subcommand to the library's
``metanorm`` console script through the ``metanorm.commands`` entry-point group):

- :mod:`metanorm_repro.experiments`: the experiment registry, the training loop, the sweep, the
  run folders and the reports;
- :mod:`metanorm_repro.models`: the paper's CNN, the stand-in networks and the norm registry;
- :mod:`metanorm_repro.datasets`: the synthetic task, the stand-ins and their sources.

The library, :mod:`metanorm`, never imports this package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metanorm-repro")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
