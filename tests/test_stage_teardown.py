"""Stage teardown: every worker that set its stages up tears them down when it finishes, failed shards
and failed setups included; a model stage's teardown releases its model and decode threads."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from curation.cli import main
from curation.engine.task import ShardTask
from curation.stages import STAGES, StageContext
from curation.stages.caption_length import CaptionLength
from tests.helpers import LAION_1K, write_config


@pytest.fixture
def test_stages():
    """`test_chars` (tests/ray_stages.py) registered in this process for one test, then removed again."""
    saved = dict(STAGES)
    import tests.ray_stages  # noqa: F401  (kept in sys.modules while the test runs: workers unpickle its params)

    yield
    sys.modules.pop("tests.ray_stages")  # re-registers on the next import
    STAGES.clear(), STAGES.update(saved)


def traced(tmp_path: Path, workers: int, poison: bool) -> tuple[int, list[tuple[str, int]]]:
    """Run captions -> test_chars (tracing its setup/teardown; the batch holding the first row raises
    when `poison`); the exit code and the trace as (event, pid)."""
    trace, flag = tmp_path / "trace.txt", tmp_path / "fail.flag"
    if poison:
        flag.touch()
    first_uid = "dummy"
    if poison:
        import pyarrow.parquet as pq

        from curation.schema import make_uid

        row = pq.read_table(LAION_1K, columns=["URL", "TEXT"]).slice(0, 1).to_pylist()[0]
        first_uid = make_uid(row["URL"], row["TEXT"])
    stages = (
        "  - caption_length: {min_words: 1}\n"
        f"  - test_chars: {{gpus: 0, trace: {trace}, fail_flag: {flag}, poison_uid: '{first_uid}'}}\n"
    )
    cfg = write_config(
        tmp_path / "run.yaml", LAION_1K, tmp_path / "out", rows_per_shard=250, workers=workers, stages=stages
    )
    rc = main(["run", str(cfg), "--no-progress"])
    events = [(line.split()[0], int(line.split()[1])) for line in trace.read_text().splitlines()]
    return rc, events


def assert_each_worker_tore_down(events: list[tuple[str, int]], workers: int) -> None:
    setups = Counter(pid for event, pid in events if event == "setup")
    teardowns = Counter(pid for event, pid in events if event == "teardown")
    assert len(setups) == workers and set(setups.values()) == {1}
    assert teardowns == setups  # once per worker, after its setup
    for pid in setups:
        assert [e for e, p in events if p == pid] == ["setup", "teardown"]


@pytest.mark.parametrize("workers", [1, 2])
def test_local_workers_tear_down_also_after_a_failed_shard(tmp_path: Path, test_stages, workers: int):
    rc, events = traced(tmp_path, workers, poison=True)
    assert rc == 1  # shard 0 failed, the others were written
    assert len(list((tmp_path / "out" / "manifests").glob("*.parquet"))) == 3
    assert_each_worker_tore_down(events, workers)


def test_single_worker_tears_down_after_a_clean_run(tmp_path: Path, test_stages):
    rc, events = traced(tmp_path, 1, poison=False)
    assert rc == 0
    assert_each_worker_tore_down(events, 1)


def test_a_failed_setup_releases_the_stages_set_up_before_it(tmp_path: Path, test_stages):
    from curation.config import load_config
    from curation.pipeline import Pipeline

    trace = tmp_path / "trace.txt"
    stages = (
        f"  - test_chars: {{gpus: 0, trace: {trace}}}\n  - caption_language: {{model: {tmp_path}/none.bin}}\n"
    )
    cfg = write_config(tmp_path / "run.yaml", LAION_1K, tmp_path / "out", stages=stages)
    task = ShardTask(None, Pipeline(load_config(cfg, stages=STAGES)), pa.schema([]))  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # fastText's own error for a missing model file
        task.setup()
    assert [line.split()[0] for line in trace.read_text().splitlines()] == ["setup", "teardown"]


def test_the_real_caption_stage_is_torn_down_by_the_local_runner(tmp_path: Path, monkeypatch):
    """A shipped stage, the in-process local runner: teardown runs once, after the last shard."""
    calls = []
    monkeypatch.setattr(CaptionLength, "teardown", lambda self: calls.append(self.name), raising=False)
    cfg = write_config(
        tmp_path / "run.yaml", LAION_1K, tmp_path / "out", stages="  - caption_length: {min_words: 1}\n"
    )
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert calls == ["caption_length"]


def test_model_stage_teardown_releases_model_and_threads():
    """The concepts stage on CPU (its bundled teacher): setup sets torch's threads to `cpus` and loads the
    model once; teardown releases it; the fp16-on-CPU refusal is ModelStage's, for every model stage."""
    torch = pytest.importorskip("torch")
    from curation.stages.concepts import Concepts, ConceptsParams

    threads = torch.get_num_threads()
    try:
        stage = Concepts(ConceptsParams(device="cpu", cpus=1), StageContext(output_dir=Path(".")))
        assert stage.precision == "fp32" and stage._model is None
        stage.setup()
        model = stage.model
        assert model is not None and torch.get_num_threads() == 1
        stage.setup()
        assert stage.model is model  # loaded once
        assert list(stage.decode_map(str, [1, 2])) == ["1", "2"]
        stage.teardown()
        assert stage._model is None and stage._decode_pool is None
    finally:
        torch.set_num_threads(threads)
    for name in ("concepts", "clip_score", "text_spotting"):
        cls = STAGES[name]
        extra = {"checkpoint": "x.pt"} if name == "clip_score" else {}
        problems = cls(cls.Params(device="cpu", precision="fp16", **extra), StageContext(Path("."))).check()
        assert "precision fp16 is not supported on CPU (use fp32 or bf16)" in problems, name
