"""Where the app keeps its files, and where the shipped assets are.

`LORA_STUDIO_HOME` puts everything under one root (tests, portable installs);
otherwise platformdirs gives the per-OS config/data/cache folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import PlatformDirs

APP_NAME = "lora-studio"
REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
TINY_MODEL_DIR = ASSETS_DIR / "tiny-sdxl"
SDXL_BASE_CONFIG_DIR = ASSETS_DIR / "sdxl-base"
DEMO_LORA_DIR = ASSETS_DIR / "loras"


@dataclass(frozen=True)
class AppDirs:
    config: Path
    data: Path
    cache: Path

    @property
    def settings_file(self) -> Path:
        return self.config / "settings.toml"

    @property
    def default_outputs(self) -> Path:
        return self.data / "outputs"


def app_dirs() -> AppDirs:
    """Resolve the folders now (never at import), creating them."""
    home = os.environ.get("LORA_STUDIO_HOME")
    if home:
        root = Path(home).expanduser().resolve()
        dirs = AppDirs(config=root / "config", data=root / "data", cache=root / "cache")
    else:
        pd = PlatformDirs(APP_NAME, appauthor=False)
        # config and data collide on macOS/Windows; keep data in its own subfolder
        dirs = AppDirs(config=pd.user_config_path, data=pd.user_data_path / "data", cache=pd.user_cache_path)
    for folder in (dirs.config, dirs.data, dirs.cache):
        folder.mkdir(parents=True, exist_ok=True)
    return dirs
