"""pytest: skip the doctests of integrations whose framework is not installed."""

from importlib.util import find_spec

collect_ignore: list[str] = []
if find_spec("pytorch_lightning") is None and find_spec("lightning") is None:
    collect_ignore.append("lightning.py")  # needs pytorch-lightning (metanorm[lightning])
