"""The image's Python scripts (files without ``.py``: ``pas-firstboot``, ``unit-env``) loaded
as modules, so that their tests call their parts as functions."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType


def script_module(path: Path, name: str) -> ModuleType:
    """The script at ``path`` run as the module ``name`` (its top level executed once)."""
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
