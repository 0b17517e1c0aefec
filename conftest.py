"""pytest, repository-wide: skip the doctests of integrations whose framework is not installed.

It lives at the repository root, outside the package, so that the wheel ships no test files.
"""

from importlib.util import find_spec

collect_ignore: list[str] = []
if find_spec("pytorch_lightning") is None and find_spec("lightning") is None:
    # needs pytorch-lightning (metanorm[lightning])
    collect_ignore.append("src/metanorm/integrations/lightning.py")
if find_spec("anndata") is None:
    collect_ignore.append("src/metanorm/integrations/anndata.py")  # metanorm[anndata]
