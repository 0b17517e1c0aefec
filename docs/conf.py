"""Sphinx configuration for the metanorm documentation (``make docs`` builds it into ``site/``)."""

from __future__ import annotations

import metanorm

project = "metanorm"
author = "metanorm developers"
copyright = "2026, metanorm developers"
release = metanorm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/_*.md"]

# the docstrings are Google style with reST roles, as PyTorch's
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# a broken cross-reference is an error (make docs runs with -W); names of other libraries are
# not resolvable offline (no intersphinx inventories can be downloaded here)
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|numpy|np|sklearn|pandas|pd|scipy|collections|typing|types|os|pathlib|threading|contextvars)(\..*)?",
    ),
    (r"py:.*", r"(Tensor|Module|Parameter|ndarray|ArrayLike|DataFrame|Path|PathLike|Callable)"),
    (r"py:.*", r"(Iterable|Iterator|Mapping|Sequence|Any|Protocol|TypeVar|Generic|Literal)"),
    (r"py:.*", r"(pytorch_lightning|lightning|monai|accelerate|matplotlib|dcor|fairlearn)(\..*)?"),
    (r"py:.*", r"(optional|default|int|float|bool|str|tuple|list|dict|None|callable|object)"),
    (r"py:.*", r"(ProcessGroup|nn\.Module|copy\..*)"),
    (r"py:class", r".*\._\w+"),  # private base classes (in "Bases:" lines) are not documented
]

html_theme = "furo"
html_title = f"metanorm {release}"
html_static_path: list[str] = []


def _skip_foreign_members(app, what, name, obj, skip, options):
    """Leaves out members inherited from other libraries (scikit-learn's ``set_*_request``)."""
    module = getattr(obj, "__module__", None) or ""
    if what == "class" and module and not module.startswith("metanorm"):
        return True
    return None


def setup(app):
    """Sphinx hook."""
    app.connect("autodoc-skip-member", _skip_foreign_members)
