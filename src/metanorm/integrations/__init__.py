"""Integrations with training frameworks, each an optional submodule.

- :mod:`metanorm.integrations.lightning`: ``MetadataNormSync``, a ``LayerSync`` plugin for
  PyTorch Lightning's DDP strategies (``pip install metanorm[lightning]``).

Importing this package imports no framework; each submodule imports its own when imported.
"""
