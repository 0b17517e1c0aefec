"""Integrations with training frameworks, each an optional submodule.

- :mod:`metanorm.integrations.lightning`: ``MetadataNormSync``, a ``LayerSync`` plugin for
  PyTorch Lightning's DDP strategies, and the callbacks ``RefitRunningBeta`` (the evaluation β
  before each validation) and ``LogProbe`` (the bias probe, logged per module each validation
  epoch) (``pip install metanorm[lightning]``).
- :mod:`metanorm.integrations.anndata`: ``regress_out(adata, keys, keep=...)``, scanpy's
  ``regress_out`` that can keep the cell type (``pip install metanorm[anndata]``).

Importing this package imports no framework; each submodule imports its own when imported.
"""
