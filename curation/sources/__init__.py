"""Input readers, one per `input.format`."""

from __future__ import annotations

from curation.config import InputConfig
from curation.sources.base import Problem, Shard, Source
from curation.sources.images import ImageFolderSource, WebDatasetSource
from curation.sources.parquet import ParquetSource

SOURCES: dict[str, type[Source]] = {
    "parquet": ParquetSource,
    "webdataset": WebDatasetSource,
    "image_folder": ImageFolderSource,
}

__all__ = ["SOURCES", "Shard", "Source", "check_input", "make_source"]


def make_source(cfg: InputConfig) -> Source:
    if cfg.format not in SOURCES:
        raise ValueError(f"input.format {cfg.format!r} is not supported; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[cfg.format](cfg)


def check_input(cfg: InputConfig) -> list[Problem]:
    if cfg.format not in SOURCES:
        return [
            (("input", "format"), f"{cfg.format!r} is not supported yet; known: {', '.join(sorted(SOURCES))}")
        ]
    return make_source(cfg).check()
