"""Modules that are scripts, not parts of a package (installers/pyinstaller/accel_libs.py, which the PyInstaller
spec imports from beside itself; bench/*.py, run with bench/ on sys.path), loaded from their files for tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path) -> ModuleType:
    """The module in `path`, named after the file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules.
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
