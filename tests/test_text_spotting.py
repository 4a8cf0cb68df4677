"""text_spotting stage: real EasyOCR (CPU), real photos, real rendered text; no mocks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("easyocr")
pytest.importorskip("easyocr_en_models")
skdata = pytest.importorskip("skimage.data")

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from curation.core.params import param_problems  # noqa: E402
from curation.core.text import tokens  # noqa: E402
from curation.models.ocr import auto_precision, decode_image, fold_batch_norm, reading_order  # noqa: E402
from curation.stages import STAGES, StageContext, apply_stage, manifest_columns  # noqa: E402
from curation.stages.text_spotting import (  # noqa: E402
    OCR_COLUMNS,
    TextSpotting,
    TextSpottingParams,
    caption_overlap,
)
from tests.imageserver import png_header_bomb  # noqa: E402

CTX = StageContext(output_dir=Path("/nonexistent"))


# --------------------------------------------------------------------------- images


def encode(img: Image.Image | np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def small(a: np.ndarray, side: int = 256) -> np.ndarray:
    """Photos downscaled so CPU OCR stays quick in the default suite."""
    img = Image.fromarray(a)
    img.thumbnail((side, side))
    return np.asarray(img.convert("RGB"))


def font(size: int = 40) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_image(text: str, size=None, bg=(245, 245, 235), fg=(15, 15, 15), mode="RGB") -> Image.Image:
    """`text` in a 40 px font on a plain background, wide enough for the whole line by default."""
    size = size or (int(font().getlength(text)) + 32, 160)
    img = Image.new(mode, size, bg)
    ImageDraw.Draw(img).text((16, size[1] // 2 - 24), text, fill=fg, font=font())
    return img


@pytest.fixture(scope="module")
def stage() -> TextSpotting:
    st = TextSpotting(TextSpottingParams(device="cpu"), CTX)
    st.setup()  # the Reader loads once for the module
    return st


# --------------------------------------------------------------------------- pure functions


def test_tokens_rules():
    assert tokens("A Dog, running! on the BEACH") == {
        "dog",
        "running",
        "on",
        "the",
        "beach",
    }  # "a" is too short
    assert tokens("e-mail x_y 3D 42 i") == {"mail", "3d", "42"}  # '-' and '_' split; 1-char dropped
    assert tokens("Café crème") == {"café", "crème"}  # Unicode letters count
    assert tokens("") == set() and tokens(None) == set() and tokens("a . !") == set()


def test_caption_overlap_examples():
    assert caption_overlap("a dog on the beach", "DOG beach") == pytest.approx(2 / 4)  # {dog,on,the,beach}
    assert caption_overlap("Sale sale SALE today", "sale") == pytest.approx(1 / 2)  # distinct tokens
    assert caption_overlap("a dog on the beach", "") == 0.0  # no text in the image
    assert caption_overlap("a", "a b c") == 0.0  # caption without qualifying tokens
    assert caption_overlap(None, "anything") == 0.0
    assert caption_overlap("Hello world", "hello, world!") == 1.0
    assert caption_overlap("dogs", "dog") == 0.0  # exact tokens, no stemming


def test_reading_order_lines_then_left_to_right():
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    found = [
        (box(300, 12, 360, 58), "dog"),
        (box(10, 10, 40, 50), "a"),
        (box(50, 10, 280, 50), "running"),
        (box(10, 100, 90, 140), "next"),
    ]
    assert [t for _, t in reading_order(found)] == ["a", "running", "dog", "next"]


def test_registered_and_schema():
    assert STAGES["text_spotting"] is TextSpotting
    assert TextSpotting.cascade
    assert TextSpotting.columns is OCR_COLUMNS and set(OCR_COLUMNS) <= set(manifest_columns())
    assert OCR_COLUMNS["ocr_boxes"] == pa.int32() and OCR_COLUMNS["ocr_area"] == pa.float32()


def test_decode_statuses():
    photo = small(skdata.astronaut(), 128)
    jpeg = encode(photo)
    args = (640, 1.0, 64_000_000)
    assert decode_image(None, *args).status == "no_image"
    assert decode_image(b"", *args).status == "no_image"
    assert decode_image(b"not an image at all", *args).status == "decode_error"
    assert decode_image(jpeg[: len(jpeg) // 2], *args).status == "truncated"
    png = encode(photo, "PNG")
    assert decode_image(png[: len(png) // 2], *args).status == "truncated"
    assert decode_image(png_header_bomb(), *args).status == "too_large"
    assert decode_image(jpeg, 640, 1.0, 100).status == "too_large"  # the cap is a parameter
    for img in (
        Image.fromarray(photo).convert("L"),  # grayscale
        Image.fromarray(photo).convert("CMYK"),
        Image.fromarray(photo).convert("P"),  # palette
        Image.fromarray(photo).convert("RGBA"),
        Image.fromarray(photo).convert("LA"),
        Image.fromarray(photo).convert("1"),
    ):
        fmt = "JPEG" if img.mode in ("L", "CMYK") else "PNG"
        d = decode_image(encode(img, fmt), *args)
        assert d.status == "ok", img.mode
        assert d.resized.dtype == np.uint8 and d.resized.shape == (128, 128, 3)
        assert d.grey.shape == (128, 128)
    d = decode_image(encode(Image.fromarray(photo), "WEBP"), *args)
    assert d.status == "ok"
    # 16-bit greyscale is rescaled, not clipped to white
    g16 = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    d = decode_image(encode(g16, "PNG"), *args)
    assert d.status == "ok" and d.resized.min() == 0 and d.resized.max() == 255
    # aspect kept and long side capped at the canvas
    d = decode_image(encode(np.zeros((300, 1200, 3), np.uint8)), 640, 1.0, 64_000_000)
    assert d.resized.shape == (160, 640, 3) and d.ratio == pytest.approx(640 / 1200)


def test_transparent_text_is_composited_on_white():
    # Black text on a fully transparent canvas: dropping alpha would leave black on black.
    img = Image.new("RGBA", (200, 80), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((10, 10), "HELLO", fill=(0, 0, 0, 255), font=font())
    d = decode_image(encode(img, "PNG"), 640, 1.0, 64_000_000)
    assert d.status == "ok"
    assert (d.grey > 200).mean() > 0.5 and (d.grey < 50).any()


def test_decide_rules():
    st = TextSpotting(TextSpottingParams(max_overlap=0.5, device="cpu"), CTX)
    t = pa.table(
        {
            "ocr_caption_overlap": pa.array([0.0, 0.49, 0.5, 1.0, None, None, None], pa.float32()),
            "ocr_status": pa.array(["ok", "ok", "ok", "ok", "decode_error", "no_image", None]),
        }
    )
    assert st.decide(t).to_pylist() == [
        None,
        None,
        "text_spotting",
        "text_spotting",
        "decode",
        "decode",
        None,
    ]


def test_check_reports_config_problems(tmp_path):
    st = TextSpotting(TextSpottingParams(device="cpu", model_dir=str(tmp_path)), CTX)
    problems = st.check()
    assert any("craft_mlt_25k.pth" in p for p in problems)
    assert TextSpotting(TextSpottingParams(device="cpu"), CTX).check() == []
    assert param_problems(TextSpottingParams(device="cpu", max_overlap=2)) == [
        ("max_overlap", "must be >= 0 and <= 1, got 2")
    ]
    import torch

    if not torch.cuda.is_available():
        assert TextSpotting(TextSpottingParams(device="auto"), CTX).resources.gpus == 0


def test_cuda_without_a_gpu_is_a_local_runner_error_not_a_ray_one(tmp_path):
    import torch

    from curation.config import ConfigError
    from curation.validation import parse_checked_config
    from tests.helpers import LAION_1K

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    text = (
        f"input: {{path: {LAION_1K}, url_column: URL, caption_column: TEXT}}\noutput: {tmp_path}/o\n"
        "runner: {type: RUNNER}\nstages:\n  - download: {}\n  - text_spotting: {device: cuda}\n"
    )
    with pytest.raises(ConfigError) as e:
        parse_checked_config(text.replace("RUNNER", "local"))
    assert "stages[1].text_spotting" in e.value.errors[0] and "needs a CUDA GPU" in e.value.errors[0]
    # on Ray the driver needs no GPU: the cluster's GPUs are checked when the run starts
    assert parse_checked_config(text.replace("RUNNER", "ray")).stages[1].name == "text_spotting"


def test_loading_and_running_the_reader_emits_no_torch_warning():
    """EasyOCR quantizes its networks on CPU; torch's deprecation warnings about that are silenced
    where the Reader is built. A fresh process: torch warns once per process, from C++."""
    import subprocess
    import sys

    from tests.helpers import REPO

    code = (
        "from pathlib import Path\n"
        "from curation.models.ocr import OcrEngine\nfrom curation.stages.text_spotting import TextSpottingParams\n"
        "engine = OcrEngine(TextSpottingParams(device='cpu'), 'cpu', 'fp32')\n"
        "print(engine.run([Path('data/demo_images/text_00.jpg').read_bytes()])[0][0])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert proc.stdout.split() == ["ok"]
    assert "Warning" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- real OCR


def test_stage_through_apply_stage(stage):
    caption = "a dog running on the beach"
    rows = [
        # (caption, image bytes, keep before this stage)
        ("an astronaut in a white suit", encode(small(skdata.astronaut())), True),
        ("a cup of coffee on a saucer", encode(small(skdata.coffee())), True),
        (caption, encode(text_image(caption)), True),  # caption written in the image
        (caption, encode(text_image(caption)), False),  # already dropped: must not be OCR'd
        ("a cat lying on a table", None, True),
        ("a cat lying on a table", encode(small(skdata.chelsea()))[:500], True),
        ("a big sale sign", png_header_bomb(), True),
        ("big sale today", encode(text_image("BIG SALE TODAY", mode="L", bg=255, fg=0), "PNG"), True),
        (
            "big sale today",
            encode(text_image("BIG SALE TODAY", mode="CMYK", bg=(0, 0, 0, 0), fg=(0, 0, 0, 255))),
            True,
        ),
        (
            "big sale today",
            encode(text_image("BIG SALE TODAY", mode="RGBA", bg=(0, 0, 0, 0), fg=(0, 0, 0, 255)), "PNG"),
            True,
        ),
        ("big sale today", encode(text_image("BIG SALE TODAY").convert("P"), "PNG"), True),
    ]
    n = len(rows)
    table = pa.table(
        {
            "caption": [r[0] for r in rows],
            "image": pa.array([r[1] for r in rows], pa.binary()),
            "keep": [r[2] for r in rows],
            "drop_reason": [None if r[2] else "complexity" for r in rows],
        }
    )
    out = apply_stage(stage, table)
    assert out.num_rows == n
    for col in OCR_COLUMNS:
        assert out.schema.field(col).type == OCR_COLUMNS[col]
    got = out.to_pylist()
    status = [r["ocr_status"] for r in got]
    assert status == ["ok", "ok", "ok", None, "no_image", "truncated", "too_large", "ok", "ok", "ok", "ok"]
    reasons = [r["drop_reason"] for r in got]
    assert (
        reasons
        == [None, None, "text_spotting", "complexity", "decode", "decode", "decode"] + ["text_spotting"] * 4
    )
    assert [r["keep"] for r in got] == [r is None for r in reasons]

    photo, text = got[0], got[2]
    assert photo["ocr_boxes"] == 0 and photo["ocr_text"] == "" and photo["ocr_area"] == 0.0
    assert photo["ocr_regions"] == []
    # The boxes, as fractions of the image size, cover the line of text drawn across the image
    # (16 px margins, about 40 px high around its middle).
    assert len(text["ocr_regions"]) == text["ocr_boxes"]
    xs = [x for r in text["ocr_regions"] for x in r["box"][0::2]]
    ys = [y for r in text["ocr_regions"] for y in r["box"][1::2]]
    assert all(len(r["box"]) == 8 and 0.0 <= v <= 1.0 for r in text["ocr_regions"] for v in r["box"])
    assert min(xs) < 0.1 and max(xs) > 0.9 and 0.15 < min(ys) < 0.5 < max(ys) < 0.85
    assert " ".join(r["text"] for r in text["ocr_regions"]) == text["ocr_text"]
    assert photo["ocr_caption_overlap"] == 0.0
    assert text["ocr_boxes"] >= 1 and 0.0 < text["ocr_area"] < 0.5
    assert text["ocr_caption_overlap"] >= 0.8
    assert "beach" in text["ocr_text"].lower()
    skipped = got[3]
    assert all(skipped[c] is None for c in OCR_COLUMNS)  # cascade: no measurement for dropped rows
    for failed in got[4:7]:
        assert failed["ocr_text"] is None and failed["ocr_caption_overlap"] is None
        assert failed["ocr_regions"] is None
    for converted in got[7:]:
        assert "sale" in converted["ocr_text"].lower()


def test_page_has_text_and_unrelated_caption_is_kept(stage):
    page = skdata.page()[
        :100
    ]  # top of a 191x384 greyscale scan of a text page (the full page is slow on CPU)
    out = apply_stage(
        stage, pa.table({"caption": ["a photo of a mountain lake"], "image": [encode(page, "PNG")]})
    )
    row = out.to_pylist()[0]
    assert row["ocr_status"] == "ok" and row["ocr_boxes"] >= 3 and row["ocr_area"] > 0.2
    assert "segmentation" in row["ocr_text"].lower()
    assert row["keep"] and row["drop_reason"] is None
    # a caption quoting the page would be dropped (one OCR pass: CPU OCR is slow)
    assert caption_overlap("Region-based segmentation", row["ocr_text"]) >= 0.5


def _assert_same_words_as_readtext(stage, images):
    out = stage.compute(pa.table({"caption": ["x"] * len(images), "image": images}))
    reader = stage.model.reader
    for got, img in zip(out.column("ocr_text").to_pylist(), images):
        expected = " ".join(t for _, t, _ in reader.readtext(img))
        assert tokens(got) == tokens(expected)


def test_same_words_as_readtext(stage):
    """The batched path finds the words EasyOCR's own readtext finds (images below the canvas)."""
    _assert_same_words_as_readtext(
        stage, [encode(text_image("Fresh bread every morning")), encode(small(skdata.coffee()))]
    )


@pytest.mark.slow
def test_same_words_as_readtext_on_a_page(stage):
    _assert_same_words_as_readtext(stage, [encode(skdata.page(), "PNG"), encode(skdata.text(), "PNG")])


def test_cpu_detector_folding_keeps_easyocr_s_heatmaps(stage):
    """The CPU path folds BatchNorm into the convs (NHWC); the heatmaps must not move."""
    import copy

    import torch

    def has_batch_norm(m):
        return any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())

    original = stage.model.reader.detector
    original = getattr(original, "module", original).eval()
    assert has_batch_norm(original), "the Reader's own detector must stay untouched"
    folded = fold_batch_norm(copy.deepcopy(original)).to(memory_format=torch.channels_last)
    assert not has_batch_norm(folded)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, _ = original(x)
        got, _ = folded(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    engine = stage.model
    assert not has_batch_norm(engine.detector)
    assert next(engine.detector.parameters()).dtype == engine.dtype
    assert engine.precision == auto_precision("cpu") in ("bf16", "fp32")
    assert auto_precision("cuda") == "fp16"


def test_empty_and_all_failed_batches(stage):
    empty = pa.table({"caption": pa.array([], pa.string()), "image": pa.array([], pa.binary())})
    assert stage.compute(empty).num_rows == 0
    bad = stage.compute(pa.table({"caption": ["a", "b"], "image": pa.array([None, b"xx"], pa.binary())}))
    assert bad.column("ocr_status").to_pylist() == ["no_image", "decode_error"]
    # no image column at all: every row is no_image
    assert stage.compute(pa.table({"caption": ["a"]})).column("ocr_status").to_pylist() == ["no_image"]


# --------------------------------------------------------------------------- heavier


@pytest.mark.slow
def test_photos_kept_and_text_dropped_at_full_size(stage):
    photos = {
        "astronaut": skdata.astronaut(),
        "coffee": skdata.coffee(),
        "chelsea": skdata.chelsea(),
        "rocket": skdata.rocket(),
        "immunohistochemistry": skdata.immunohistochemistry(),
    }
    phrases = [
        "Grand opening this weekend",
        "Best pizza in town",
        "Happy birthday Emma",
        "Keep calm and carry on",
    ]
    rows = [(f"a photo of {k}", encode(v)) for k, v in photos.items()]
    for k, phrase in enumerate(phrases):
        img = text_image(phrase, size=(512, 384), bg=(200 + 10 * k, 230, 250), fg=(40 * k, 0, 60))
        # text over a photo, not only on a flat background
        if k % 2:
            base = Image.fromarray(small(skdata.astronaut(), 512)).resize((512, 384))
            ImageDraw.Draw(base).text((20, 300), phrase, fill=(255, 255, 0), font=font(44))
            img = base
        rows.append((phrase, encode(img)))
    out = apply_stage(stage, pa.table({"caption": [r[0] for r in rows], "image": [r[1] for r in rows]}))
    reasons = out.column("drop_reason").to_pylist()
    assert reasons == [None] * len(photos) + ["text_spotting"] * len(phrases), out.column(
        "ocr_text"
    ).to_pylist()

    reader = stage.model.reader
    for got, (_, img) in zip(out.column("ocr_text").to_pylist(), rows):
        expected = " ".join(t for _, t, _ in reader.readtext(img))
        assert bool(tokens(got)) == bool(tokens(expected))
        if tokens(expected):
            # Not exact: readtext(bytes) greys with swapped channel weights (cvtColor(RGB, BGR2GRAY)),
            # the stage with the right ones, so a hard word over a photo can differ by a character.
            assert len(tokens(got) & tokens(expected)) / len(tokens(expected)) >= 0.6


def test_ocr_weights_are_fingerprinted_by_content_not_by_folder(tmp_path):
    """Like every model file: the same weights in another folder keep a run's config hash; another file
    under the same name changes it."""
    from curation.config import parse_config
    from curation.models.ocr import MODEL_FILES, ocr_model_dir
    from curation.stages import build_stages

    package = Path(ocr_model_dir(TextSpottingParams()))
    folders = {name: tmp_path / name for name in ("a", "b", "c")}
    for folder in folders.values():
        folder.mkdir()
        for f in MODEL_FILES:
            (folder / f).symlink_to(package / f)
    (folders["c"] / MODEL_FILES[1]).unlink()
    (folders["c"] / MODEL_FILES[1]).write_bytes(b"other weights")

    def config_hash(model_dir: Path | None) -> str:
        params = f"{{model_dir: {model_dir}}}" if model_dir else "{}"
        text = f"input: {{path: x.parquet}}\noutput: {tmp_path}/out\nstages:\n  - text_spotting: {params}\n"
        config = parse_config(text, stages=STAGES)
        return config.run_fingerprint(build_stages(config))[1]

    assert config_hash(folders["a"]) == config_hash(folders["b"]) == config_hash(None)
    assert config_hash(folders["c"]) != config_hash(folders["a"])
