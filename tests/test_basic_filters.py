"""The basic checks (caption length, caption language, image size) and the phash stage, on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.core.params import param_problems
from curation.core.phash import hamming, phash_image
from curation.stages import STAGES, StageContext, apply_stage
from curation.stages.caption_language import CaptionLanguage, CaptionLanguageParams, LanguageIdentifier
from curation.stages.caption_length import CaptionLength, CaptionLengthParams
from curation.stages.image_size import ImageSize, ImageSizeParams
from curation.stages.phash import Phash, PhashParams
from tests.helpers import LAION_1K
from tests.images import PHOTOS, encode, near_duplicates, photo
from tests.imageserver import png_header_bomb

CTX = StageContext(output_dir=Path("/nonexistent"))


def reasons(stage, table: pa.Table) -> list:
    return apply_stage(stage, table).column("drop_reason").to_pylist()


# --------------------------------------------------------------------------- caption_length


def test_caption_length_counts_as_datacomp_does():
    captions = ["a dog", "a  dog\trunning\n", "   ", None, "Café au lait ☕", "x" * 7, "one two three"]
    out = CaptionLength(CaptionLengthParams(), CTX).compute(pa.table({"caption": captions}))
    assert out.column("caption_words").to_pylist() == [len(c.split()) if c else 0 for c in captions]
    assert out.column("caption_chars").to_pylist() == [len(c) if c else 0 for c in captions]
    assert out.column("caption_chars").to_pylist()[4] == 14  # code points, not bytes


def test_caption_length_decisions_and_thresholds():
    table = pa.table({"caption": ["a dog", "a dog runs", "a b c", "one two three four five six"]})
    default = CaptionLength(CaptionLengthParams(), CTX)  # DataComp: words > 2, chars > 5
    assert reasons(default, table) == ["caption_length", None, "caption_length", None]
    assert default.thresholds() == {"caption_words": (">=", 3.0), "caption_chars": (">=", 6.0)}
    capped = CaptionLength(CaptionLengthParams(min_words=0, min_chars=0, max_words=4), CTX)
    assert reasons(capped, table) == [None, None, None, "caption_length"]
    assert capped.thresholds() == {"caption_words": ("<=", 4.0)}
    assert param_problems(CaptionLengthParams(min_words=5, max_words=2)) == [
        ("max_words", "must be >= min_words (5), got 2")
    ]


# --------------------------------------------------------------------------- caption_language


@pytest.fixture(scope="module")
def identifier() -> LanguageIdentifier:
    return LanguageIdentifier()


def test_language_of_known_captions(identifier):
    langs, scores = identifier.identify(
        [
            "a brown dog running on the beach",
            "Ein kleiner Hund läuft am Strand entlang",
            "un petit chien court sur la plage",
            "一只小狗在海滩上奔跑",
            "line one\nline two of an english caption",
            "",
            None,
            "surrogate \ud800 in a caption of english words",
        ]
    )
    assert langs[:5] == ["en", "de", "fr", "zh", "en"]
    assert langs[5] is None and langs[6] is None and np.isnan(scores[5:7]).all()
    assert langs[7] == "en"
    assert np.all((scores[:5] > 0.3) & (scores[:5] <= 1.0))


def test_language_stage_on_real_laion_captions():
    captions = pq.read_table(LAION_1K, columns=["TEXT"]).column("TEXT")
    stage = CaptionLanguage(CaptionLanguageParams(), CTX)
    out = apply_stage(stage, pa.table({"caption": captions}))
    langs = out.column("caption_lang").to_pylist()
    english = sum(lang == "en" for lang in langs) / len(langs)
    assert 0.6 < english < 1.0  # LAION's English subset, as fastText judges it
    dropped = out.column("drop_reason").to_pylist()
    assert all((r == "language") == (lang != "en") for r, lang in zip(dropped, langs))
    strict = CaptionLanguage(CaptionLanguageParams(languages=["en"], min_score=0.9), CTX)
    assert strict.thresholds() == {"caption_lang_score": (">=", 0.9)}
    kept_strict = sum(r is None for r in reasons(strict, pa.table({"caption": captions})))
    assert kept_strict < sum(r is None for r in dropped)


def test_language_config_problems(tmp_path):
    assert CaptionLanguage(CaptionLanguageParams(), CTX).check() == []
    problems = CaptionLanguage(
        CaptionLanguageParams(languages=[], model=str(tmp_path / "no.ftz")), CTX
    ).check()
    assert any("languages is empty" in p for p in problems)
    assert any("language model file not found" in p for p in problems)


# --------------------------------------------------------------------------- image_size


def test_image_size_from_original_dimensions_without_images():
    table = pa.table(
        {
            "original_width": pa.array([640, 199, 1000, 300, None], pa.int32()),
            "original_height": pa.array([480, 400, 300, 901, None], pa.int32()),
        }
    )
    stage = ImageSize(ImageSizeParams(), CTX)  # DataComp: short side >= 200, ratio <= 3
    out = apply_stage(stage, table)
    assert out.column("min_side").to_pylist() == [480, 199, 300, 300, None]
    assert out.column("aspect_ratio").to_pylist()[:4] == pytest.approx(
        [640 / 480, 400 / 199, 1000 / 300, 901 / 300]
    )
    assert out.column("image_size_status").to_pylist() == ["ok", "ok", "ok", "ok", "no_image"]
    assert out.column("drop_reason").to_pylist() == [None, "image_size", "image_size", "image_size", "decode"]
    assert stage.thresholds() == {"min_side": (">=", 200.0), "aspect_ratio": ("<=", 3.0)}
    square = pa.table(
        {"original_width": pa.array([600], pa.int32()), "original_height": pa.array([200], pa.int32())}
    )
    assert reasons(stage, square) == [None]  # exactly 3.0 passes


def test_image_size_from_the_header_of_image_inputs():
    coffee = photo("coffee")  # 600 x 400
    jpeg = encode(coffee)
    images = [jpeg, encode(coffee.resize((150, 100)), "PNG"), png_header_bomb(), b"garbage", jpeg[:100]]
    out = apply_stage(ImageSize(ImageSizeParams(), CTX), pa.table({"image": images}))
    assert out.column("min_side").to_pylist()[:2] == [400, 100]
    assert out.column("image_size_status").to_pylist() == [
        "ok",
        "ok",
        "too_large",
        "decode_error",
        "truncated",
    ]
    assert out.column("drop_reason").to_pylist() == [None, "image_size", "decode", "decode", "decode"]


# --------------------------------------------------------------------------- phash


def test_phash_is_imagehash_bit_for_bit():
    imagehash = pytest.importorskip("imagehash")
    for name in PHOTOS:
        img = photo(name)
        ref = int(str(imagehash.phash(img)), 16)
        assert phash_image(img) == (ref - (1 << 64) if ref >= 1 << 63 else ref), name


def test_phash_stage_near_duplicates_close_distinct_far():
    rows, names = [], []
    for name in PHOTOS:
        img = photo(name)
        rows.append(encode(img, "PNG"))
        names.append(name)
        for kind, copy in near_duplicates(img).items():
            rows.append(copy if isinstance(copy, bytes) else encode(copy, "JPEG", quality=90))
            names.append(f"{name}:{kind}")
    out = Phash(PhashParams(), CTX).compute(pa.table({"image": rows}))
    assert out.column("phash_status").to_pylist() == ["ok"] * len(rows)
    hashes = out.column("phash").to_numpy()
    same = np.array([n.split(":")[0] for n in names])
    dist = hamming(hashes[:, None], hashes[None, :])
    near = dist[same[:, None] == same[None, :]]
    far = dist[same[:, None] != same[None, :]]
    assert near.max() <= 8 and far.min() >= 16, (near.max(), far.min())
    digests = out.column("sha256").to_pylist()
    import hashlib

    assert digests == [hashlib.sha256(r).hexdigest() for r in rows]


def test_phash_statuses_and_an_earlier_sha256_wins():
    good = encode(photo("coins"))
    table = pa.table(
        {"image": [good, None, b"junk", good[:200], png_header_bomb()], "sha256": ["img2dataset"] * 5}
    )
    out = apply_stage(Phash(PhashParams(), CTX), table)
    assert out.column("phash_status").to_pylist() == [
        "ok",
        "no_image",
        "decode_error",
        "truncated",
        "too_large",
    ]
    assert out.column("phash").null_count == 4
    assert out.column("drop_reason").to_pylist() == [None, "decode", "decode", "decode", "decode"]
    assert out.column("sha256").to_pylist() == ["img2dataset"] * 5


def test_all_registered_and_image_stages_need_a_download_first(tmp_path, capsys):
    from curation.cli import main

    for name in ("caption_length", "caption_language", "image_size", "phash", "clip_score"):
        assert name in STAGES
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"input: {{path: {LAION_1K}, url_column: URL, caption_column: TEXT}}\n"
        f"output: {tmp_path / 'run'}\n"
        "stages:\n  - caption_length: {}\n  - phash: {}\n  - image_size: {}\n"
    )
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "phash needs images: put it after the download stage" in err
    assert "image_size needs images" in err
