"""Errors a runner raises before doing any work (the CLI reports them with exit code 2)."""

from __future__ import annotations


class RunnerError(Exception):
    """The runner cannot execute this config here: an unreachable cluster, a GPU stage without GPUs."""


class StoreUnavailable(Exception):
    """The output's store failed several shards in a row: stop instead of failing every shard left
    (each after its retry budget). Committed shards are kept; the same command resumes."""
