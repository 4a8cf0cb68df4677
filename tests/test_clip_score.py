"""clip_score stage: a real open_clip model (curate-tiny, random weights saved as a checkpoint), real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("skimage")

from curation.cli import main  # noqa: E402
from curation.models.clip import MODEL_CONFIG_DIR, build_model  # noqa: E402
from curation.stages import STAGES, StageContext, apply_stage, manifest_columns  # noqa: E402
from curation.stages.clip_score import ClipScore, ClipScoreParams  # noqa: E402
from tests.images import PHOTOS, encode, photo  # noqa: E402
from tests.imageserver import png_header_bomb  # noqa: E402

CTX = StageContext(output_dir=Path("/nonexistent"))
CAPTIONS = [
    "an astronaut in a white suit",
    "a cup of coffee on a saucer",
    "a cat looking at the camera",
    "a rocket on the launch pad",
    "a man with a camera on a tripod",
    "old coins on a table",
    "a horse drawing",
    "a retina image from a microscope",
    "a page of printed text",
    "the moon",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A `curate train`-style checkpoint of curate-tiny with fixed random weights."""
    torch.manual_seed(0)
    built = build_model("curate-tiny")
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save({"model_name": "curate-tiny", "state_dict": built.model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def stage(checkpoint) -> ClipScore:
    st = ClipScore(
        ClipScoreParams(checkpoint=str(checkpoint), device="cpu", batch_size=4, keep_embedding=True), CTX
    )
    st.setup()
    return st


def reference_scores(checkpoint: Path, images, captions) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's own encode_image / encode_text, one pair at a time."""
    from curation.models.clip import load_for_eval

    built = load_for_eval(str(checkpoint))
    scores, embeddings = [], []
    with torch.no_grad():
        for img, cap in zip(images, captions):
            i = torch.nn.functional.normalize(
                built.model.encode_image(built.preprocess_val(img)[None]), dim=-1
            )
            t = torch.nn.functional.normalize(built.model.encode_text(built.tokenizer([cap])), dim=-1)
            scores.append(float((i * t).sum()))
            embeddings.append(i[0].numpy())
    return np.array(scores), np.stack(embeddings)


def test_registered_schema_and_columns(checkpoint):
    assert STAGES["clip_score"] is ClipScore and ClipScore.cascade
    assert manifest_columns()["clip_score"] == pa.float32()
    assert manifest_columns()["clip_image_embedding"] == pa.list_(pa.float16())
    plain = ClipScore(ClipScoreParams(checkpoint=str(checkpoint)), CTX)
    assert list(plain.columns) == ["clip_score", "clip_status"]
    assert (
        "clip_image_embedding" in ClipScore(ClipScoreParams(checkpoint="x", keep_embedding=True), CTX).columns
    )
    assert plain.resources.gpus == (1.0 if torch.cuda.is_available() else 0.0)


def test_scores_agree_with_open_clip_one_pair_at_a_time(stage, checkpoint):
    # PNG: no JPEG draft scaling, so both paths see exactly the same pixels.
    images = [photo(n) for n in PHOTOS]
    table = pa.table({"image": [encode(i, "PNG") for i in images], "caption": CAPTIONS})
    out = stage.compute(table)
    ref, ref_emb = reference_scores(checkpoint, images, CAPTIONS)
    got = out.column("clip_score").to_numpy()
    assert got.dtype == np.float32 and got.shape == (len(PHOTOS),)
    assert np.all((got >= -1) & (got <= 1))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert out.column("clip_status").to_pylist() == ["ok"] * len(PHOTOS)
    emb = np.array(out.column("clip_image_embedding").to_pylist(), dtype=np.float32)
    assert emb.shape == ref_emb.shape
    np.testing.assert_allclose(emb, ref_emb, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    # deterministic: the same batch scores the same again
    again = stage.compute(table).column("clip_score").to_numpy()
    np.testing.assert_array_equal(again, got)


def test_large_jpegs_are_decoded_at_reduced_scale_close_to_full_decode(stage, checkpoint):
    img = photo("retina")  # 1411 px: libjpeg decodes it at 1/8 scale for a 28 px model
    table = pa.table({"image": [encode(img, "JPEG", quality=95)], "caption": [CAPTIONS[7]]})
    got = stage.compute(table).column("clip_score").to_numpy()[0]
    ref, _ = reference_scores(checkpoint, [img], [CAPTIONS[7]])
    assert abs(got - ref[0]) < 0.05


def test_bad_images_and_captions_are_statuses(stage):
    good = encode(photo("coffee"))
    table = pa.table(
        {
            "image": [good, None, b"not an image", good[: len(good) // 2], png_header_bomb(), good, good],
            "caption": ["a cup", "a cup", "a cup", "a cup", "a cup", "", None],
        }
    )
    out = stage.compute(table)
    status = out.column("clip_status").to_pylist()
    assert status == ["ok", "no_image", "decode_error", "truncated", "too_large", "no_caption", "no_caption"]
    scores = out.column("clip_score").to_pylist()
    assert scores[0] is not None and scores[1:] == [None] * 6
    emb = out.column("clip_image_embedding").to_pylist()
    assert emb[0] is not None and emb[5] is not None  # no caption: the image is still embedded
    assert emb[1:5] == [None] * 4


def test_decisions_and_thresholds(checkpoint):
    good = encode(photo("coffee"), "PNG")
    table = pa.table(
        {
            "uid": ["a", "b", "c", "d"],
            "image": [good, good, None, good],
            "caption": ["a cup", "x", "a cup", ""],
        }
    )
    plain = ClipScore(ClipScoreParams(checkpoint=str(checkpoint), device="cpu"), CTX)
    out = apply_stage(plain, table)
    assert out.column("drop_reason").to_pylist() == [None, None, "decode", None]
    assert plain.thresholds() == {}
    scores = out.column("clip_score").to_pylist()
    cut = (scores[0] + scores[1]) / 2
    strict = ClipScore(ClipScoreParams(checkpoint=str(checkpoint), device="cpu", min=cut), CTX)
    assert strict.thresholds() == {"clip_score": (">=", cut)}
    reasons = apply_stage(strict, table).column("drop_reason").to_pylist()
    low = 0 if scores[0] < cut else 1
    expected = [None, None, "decode", "clip_score"]
    expected[low] = "clip_score"
    assert reasons == expected


def _config(tmp_path: Path, stage_params: str) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    photo("coffee").save(tmp_path / "imgs" / "coffee.png")
    (tmp_path / "imgs" / "coffee.txt").write_text("a cup of coffee")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"input: {{format: image_folder, path: {tmp_path / 'imgs'}}}\n"
        f"output: {tmp_path / 'run'}\n"
        "runner: {type: local, workers: 1, progress: false}\n"
        f"stages:\n  - clip_score: {stage_params}\n"
    )
    return cfg


def test_config_errors_before_any_work(tmp_path, checkpoint, capsys):
    # a JSON config whose text tower has one more layer than the checkpoint's
    cfg = json.loads((MODEL_CONFIG_DIR / "curate-tiny.json").read_text())
    cfg["text_cfg"]["layers"] += 1
    deeper_text = tmp_path / "tiny-deeper-text.json"
    deeper_text.write_text(json.dumps(cfg))
    cfg = json.loads((MODEL_CONFIG_DIR / "curate-tiny.json").read_text())
    cfg["vision_cfg"]["width"] = 64
    narrow_image = tmp_path / "tiny-narrow-image.json"
    narrow_image.write_text(json.dumps(cfg))
    bare = tmp_path / "state_dict.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["state_dict"], bare)

    cases = [
        ("{}", "checkpoint is required"),
        (f"{{checkpoint: {tmp_path / 'missing.pt'}}}", "checkpoint not found"),
        (f"{{checkpoint: {checkpoint}, model: ViT-Nope-99}}", "unknown open_clip model 'ViT-Nope-99'"),
        (f"{{checkpoint: {checkpoint}, model: {deeper_text}}}", "text tower differs"),
        (f"{{checkpoint: {checkpoint}, model: {narrow_image}}}", "image tower differs"),
        (f"{{checkpoint: {bare}}}", "does not name its model"),
        (
            f"{{checkpoint: {checkpoint}, min: 2.0, batch_size: 0}}",
            "min (line 5): must be >= -1 and <= 1, got 2 (a cosine similarity)",
        ),
    ]
    for params, message in cases:
        assert main(["validate", str(_config(tmp_path, params))]) == 2, params
        err = capsys.readouterr().err
        assert message in err, (params, err)
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing ran
    # an open_clip state dict with its model named loads, as does the curate checkpoint
    assert main(["validate", str(_config(tmp_path, f"{{checkpoint: {bare}, model: curate-tiny}}"))]) == 0
    capsys.readouterr()


def test_run_then_select_top_fraction_over_the_whole_run(tmp_path, checkpoint, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name, cap in zip(PHOTOS, CAPTIONS):
        photo(name).save(imgs / f"{name}.png")
        (imgs / f"{name}.txt").write_text(cap)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"input: {{format: image_folder, path: {imgs}, rows_per_shard: 3}}\n"
        f"output: {tmp_path / 'run'}\n"
        "runner: {type: local, workers: 1, progress: false}\n"
        f"stages:\n  - clip_score: {{checkpoint: {checkpoint}, device: cpu}}\n"
    )
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "top.parquet"
    rc = main(
        [
            "select",
            str(tmp_path / "run"),
            "--top-fraction",
            "0.3",
            "--by",
            "clip_score",
            "--uids-only",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    import duckdb

    con = duckdb.connect()
    glob = tmp_path / "run" / "manifests" / "*.parquet"
    ranked = con.execute(f"SELECT uid FROM '{glob}' ORDER BY clip_score DESC").fetchall()
    chosen = {r[0] for r in con.execute(f"SELECT uid FROM '{out}'").fetchall()}
    # DataComp's rule over all 4 shards: threshold at position int(10 * 0.3) = 3, so the top 4 rows
    assert chosen == {r[0] for r in ranked[:4]}
    assert "top 30% by clip_score of 10 rows" in capsys.readouterr().out
    assert main(["select", str(tmp_path / "run"), "--top-fraction", "0.3", "--out", str(tmp_path / "x")]) == 2
    assert (
        main(
            [
                "select",
                str(tmp_path / "run"),
                "--top-fraction",
                "1.5",
                "--by",
                "clip_score",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "select",
                str(tmp_path / "run"),
                "--top-fraction",
                "0.3",
                "--by",
                "nope",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "no such column" in capsys.readouterr().err


def test_a_model_that_gives_nan_is_an_error_status_not_ok(tmp_path):
    """A checkpoint with NaN weights used to give `clip_status = ok` with a null score."""
    torch.manual_seed(0)
    built = build_model("curate-tiny")
    state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in built.model.state_dict().items()
    }
    bad = tmp_path / "nan.pt"
    torch.save({"model_name": "curate-tiny", "state_dict": state}, bad)
    st = ClipScore(ClipScoreParams(checkpoint=str(bad), device="cpu", batch_size=4), CTX)
    st.setup()
    good = encode(photo("coffee"))
    out = st.compute(pa.table({"image": [good, good, None], "caption": ["a cup", "a mug", "a cup"]}))
    assert out.column("clip_status").to_pylist() == ["not_finite", "not_finite", "no_image"]
    assert out.column("clip_score").to_pylist() == [None, None, None]
