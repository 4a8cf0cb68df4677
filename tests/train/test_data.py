"""The shard reader: layout, open_clip compatibility, and the exact-resume property of the stream."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from train.data import ShardStream, count_from_sizes, expand_shards, make_loader


def test_layout_written_by_helper(fmnist_shards: Path) -> None:
    sizes = json.loads((fmnist_shards / "sizes.json").read_text())
    assert sizes == {f"{i:05d}.tar": 128 for i in range(4)}
    with tarfile.open(fmnist_shards / "00000.tar") as tar:
        names = tar.getnames()[:3]
        assert [Path(n).suffix for n in names] == [".png", ".txt", ".json"]
        meta = json.loads(tar.extractfile(names[2]).read())
        caption = tar.extractfile(names[1]).read().decode()
    assert meta["uid"] == Path(names[0]).stem and meta["class"] in caption


def test_expand_and_count(fmnist_shards: Path) -> None:
    brace = expand_shards(str(fmnist_shards / "{00000..00003}.tar"))
    assert brace == expand_shards(str(fmnist_shards / "*.tar"))
    assert len(brace) == 4 and count_from_sizes(brace) == 512 and count_from_sizes(brace[:1]) == 128
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_shards(str(fmnist_shards / "nope-*.tar"))


def test_open_clip_train_reads_the_same_shards(fmnist_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip's own --train-data/--dataset-type webdataset path on our layout (sizes.json included).

    Upstream incompatibility, not ours: webdataset 0.2.111's tar_file_expander yields an empty dict
    as an end-of-shard marker, which open_clip_train 3.3.0's group_by_keys_nothrow cannot handle
    (KeyError 'fname'). Turning the marker off restores the behaviour open_clip_train was written for.
    """
    import functools
    from argparse import Namespace

    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    monkeypatch.setattr(ocd, "tar_file_expander", functools.partial(tar_file_expander, eof_value=None))
    get_wds_dataset = ocd.get_wds_dataset

    from curation.models.clip import build_model

    built = build_model("curate-tiny")
    args = Namespace(
        train_data=str(fmnist_shards / "{00000..00003}.tar"),
        train_num_samples=None,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        batch_size=32,
        workers=1,
        world_size=1,
        seed=0,
        distributed=False,
    )
    data = get_wds_dataset(args, built.preprocess_train, is_train=True, tokenizer=built.tokenizer)
    assert data.dataloader.num_samples == 512  # read from our sizes.json
    images, texts = next(iter(data.dataloader))
    assert images.shape == (32, 3, 28, 28) and texts.shape == (32, 12)


def _batches(
    shards: list[str], start: int, n: int, workers: int, **kw
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from curation.models.clip import build_model

    built = build_model("curate-tiny")
    stream = ShardStream(
        shards, 8, built.preprocess_train, built.tokenizer, start_step=start, shuffle_buffer=32, **kw
    )
    it = iter(make_loader(stream, workers))
    return [(b["image"], b["text"]) for b in (next(it) for _ in range(n))]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_yields_the_same_batches(fmnist_shards: Path, workers: int) -> None:
    shards = expand_shards(str(fmnist_shards / "*.tar"))
    full = _batches(shards, 0, 7, workers)
    for start in (3, 4):  # both parities: with 2 workers the next batch comes from either worker
        resumed = _batches(shards, start, 7 - start, workers)
        for (a_img, a_txt), (b_img, b_txt) in zip(full[start:], resumed):
            assert torch.equal(a_img, b_img) and torch.equal(a_txt, b_txt)
    # The stream is endless: it wraps into the next epoch (512 samples = 64 batches of 8) without ending.
    assert len({tuple(t[0].tolist()) for _, t in full}) > 1


def test_ranks_read_disjoint_samples(fmnist_shards: Path) -> None:
    shards = expand_shards(str(fmnist_shards / "*.tar"))
    seen = []
    for rank in (0, 1):
        batches = _batches(shards, 0, 4, 0, rank=rank, world_size=2)
        seen.append({img.flatten().sum().item() for imgs, _ in batches for img in imgs})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_hostile_images_are_refused_from_their_header(tmp_path: Path) -> None:
    """Training and evaluation decode through curation.core.imageio: a header claiming 10^10 pixels is
    refused before any pixel is read; an evaluation folder leaves it (and a corrupt file) out."""
    import io

    from PIL import Image

    from tests.imageserver import png_header_bomb
    from train.evaluate import read_image_folder

    stream = ShardStream([], 2, lambda im: im, lambda texts: texts)
    bomb = {"__key__": "x", "__url__": "s.tar", "png": png_header_bomb(), "txt": b"a caption"}
    with pytest.raises(ValueError, match="too_large"):
        stream._decode(bomb)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        buf = io.BytesIO()
        Image.new("L", (8, 8), 128).save(buf, "PNG")
        (tmp_path / name / "ok.png").write_bytes(buf.getvalue())
    (tmp_path / "cat" / "bomb.png").write_bytes(png_header_bomb())
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    images, labels, names = read_image_folder(tmp_path)
    assert labels == [0, 1] and names == ["cat", "dog"]
    assert all(im.mode == "RGB" and im.size == (8, 8) for im in images)
