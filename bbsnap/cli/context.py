"""Wiring: build settings and the real ports once per command, lazily.

Nothing heavy is imported until a command needs it, so ``bbsnap --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..catalogue import Catalogue
    from ..config import Settings
    from ..layout import DataDir
    from ..services.image_import import ImageImporter
    from ..services.images import ImageService


@dataclass
class AppContext:
    overrides: dict[str, Any]
    debug: bool = False
    _settings: "Settings | None" = None
    _catalogue: "Catalogue | None" = None
    _data_dir: "DataDir | None" = None
    _closers: list[Any] = field(default_factory=list)

    @property
    def settings(self) -> "Settings":
        if self._settings is None:
            from ..config import load_settings

            self._settings = load_settings(self.overrides)
        return self._settings

    @property
    def data_dir(self) -> "DataDir":
        if self._data_dir is None:
            from ..layout import DataDir

            self._data_dir = DataDir(self.settings.data_dir).ensure()
        return self._data_dir

    @property
    def catalogue(self) -> "Catalogue":
        if self._catalogue is None:
            from ..catalogue import Catalogue
            from ..services.recovery import recover_interrupted

            self._catalogue = Catalogue(self.data_dir.catalogue_path)
            self._closers.append(self._catalogue.close)
            recover_interrupted(self._catalogue, self.data_dir)
        return self._catalogue

    def images(self) -> "ImageService":
        from ..services.images import ImageService

        return ImageService(self.catalogue, self.data_dir)

    def importer(self) -> "ImageImporter":
        from ..services.image_import import ImageImporter

        return ImageImporter(self.catalogue, self.data_dir, self.settings)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
