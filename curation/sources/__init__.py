"""Input readers, one per `input.format`."""

from __future__ import annotations

from collections.abc import Collection

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


def make_source(cfg: InputConfig, stage_columns: Collection[str]) -> Source:
    """The reader of `cfg`; `stage_columns` (`curation.stages.manifest_columns()`) are the names an
    input column is not carried under as is (see `Source.carried_name`)."""
    if cfg.format not in SOURCES:
        raise ValueError(f"input.format {cfg.format!r} is not supported; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[cfg.format](cfg, stage_columns)


def check_input(cfg: InputConfig, stage_columns: Collection[str]) -> list[Problem]:
    if cfg.format not in SOURCES:
        return [
            (("input", "format"), f"{cfg.format!r} is not supported yet; known: {', '.join(sorted(SOURCES))}")
        ]
    return make_source(cfg, stage_columns).check()
