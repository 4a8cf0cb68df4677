"""A configured pipeline: the source, the stages and the manifest schema.

Runners decide where and how many shards run at once; what happens to a shard
is defined once, in `curation.engine.task`.
"""

from __future__ import annotations

import pyarrow as pa

from curation.config import Config
from curation.schema import manifest_schema
from curation.sources import make_source
from curation.stages import Stage, build_stages, manifest_columns


class Pipeline:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.source = make_source(config.input, manifest_columns())
        self.stages: list[Stage] = build_stages(config)

    @property
    def schema(self) -> pa.Schema:
        columns = [column for stage in self.stages for column in stage.columns.items()]
        return manifest_schema(self.source.carried_schema(), columns)
