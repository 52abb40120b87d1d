"""Alias ``spconv`` → ``spconv_triton`` for random-weight GPU runs only (see ../../README.md).

SAM 3D imports ``spconv.pytorch``; spconv-triton ships the same API under ``spconv_triton.pytorch``.
"""

import sys

import spconv_triton as _impl
import spconv_triton.pytorch as pytorch  # noqa: F401

from spconv_triton import *  # noqa: F401,F403

sys.modules[__name__ + ".pytorch"] = pytorch
for _name, _module in list(sys.modules.items()):
    if _name.startswith("spconv_triton.pytorch."):
        sys.modules["spconv.pytorch." + _name[len("spconv_triton.pytorch."):]] = _module
__version__ = _impl.__version__
