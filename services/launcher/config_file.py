"""The config file ``make up`` uses: ``DATA/gridstor.yaml``, written with every default on first start.

The text comes from the settings' own definitions (services/common/config_text.py), so each
setting appears with its default value and a description in words.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from services.common.config_text import default_yaml

CONFIG_NAME = "gridstor.yaml"


def ensure_config(data_dir: Path, config: str | None) -> tuple[Path, bool]:
    """The config path to use, and whether it was just written (only the default path is ever written)."""
    if config is not None:
        return Path(config).absolute(), False
    path = data_dir / CONFIG_NAME
    if path.exists():
        return path, False
    tmp = path.with_name(f".{CONFIG_NAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold a secret later
    try:
        with os.fdopen(fd, "w") as f:
            f.write(default_yaml(data_dir))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path, True
