"""Optional compiled CPU kernel for metanorm; use it through :mod:`metanorm._native`.

The extension module :mod:`metanorm_native._C` is built against the installed torch (which is
imported first here, so that its libraries are loaded) and works only with that version.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

__all__: list[str] = []
__version__ = "0.1.0"
