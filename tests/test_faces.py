"""The faces stage with OpenCV's packaged cascade on real photos (scikit-image's), through `curate run`,
`curate select --where "faces = 0"` and `--blur-faces`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import skimage.data
from PIL import Image

from curation.cli import main

GOOD = "A man rides a red bicycle down the street."
# The astronaut's face lies inside this box of the 512 x 512 photo (x0, y0, x1, y1; by eye).
ASTRONAUT_FACE = (150, 40, 300, 200)


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def face_run(tmp_path: Path, stages: str = "  - faces: {}\n") -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
    }
    for name, array in photos.items():
        (folder / f"{name}.jpg").write_bytes(jpeg(array))
        (folder / f"{name}.txt").write_text(GOOD)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "broken.txt").write_text(GOOD)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""input: {{format: image_folder, path: {folder}}}
output: {tmp_path / "run"}
runner: {{type: local, workers: 1, progress: false}}
stages:
{stages}"""
    )
    assert main(["run", str(cfg)]) == 0
    return tmp_path / "run"


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_faces_stage_finds_the_astronaut_and_no_face_elsewhere(tmp_path):
    # max_side below the photos' 512+ px: detection on a shrunk copy, boxes scaled back
    run = face_run(
        tmp_path, "  - faces: {scale_factor: 1.1, min_neighbors: 5, min_size: 20, max_side: 400}\n"
    )
    rows = {Path(r["url"]).stem: r for r in pq.read_table(run / "manifests").to_pylist()}
    assert rows["astronaut"]["faces"] == 1
    [box] = rows["astronaut"]["face_boxes"]
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert x0 <= box["x"] and box["x"] + box["w"] <= x1 and y0 <= box["y"] and box["y"] + box["h"] <= y1
    assert box["w"] >= 60
    for name in ("chelsea", "coffee", "rocket"):
        assert (rows[name]["faces"], rows[name]["face_boxes"], rows[name]["faces_status"]) == (0, [], "ok")
    broken = rows["broken"]
    assert (broken["faces"], broken["faces_status"], broken["drop_reason"]) == (
        None,
        "decode_error",
        "decode",
    )
    fingerprint = json.loads((run / "run.json").read_text())["fingerprint"]["stage_fingerprints"]["faces"]
    assert (
        fingerprint["cascade"] == "haarcascade_frontalface_alt2.xml"
        and len(fingerprint["cascade_sha256"]) == 64
    )


def test_select_where_no_faces_and_blur_faces(tmp_path, capsys):
    run = face_run(tmp_path)
    assert main(["select", str(run), "--where", "faces = 0", "--out", str(tmp_path / "nofaces")]) == 0
    texts = [v for k, v in members(tmp_path / "nofaces" / "00000.tar").items() if k.endswith(".json")]
    assert sorted(Path(json.loads(t)["url"]).stem for t in texts) == ["chelsea", "coffee", "rocket"]

    assert main(["select", str(run), "--where", "keep", "--out", str(tmp_path / "plain")]) == 0
    assert main(["select", str(run), "--where", "keep", "--blur-faces", "--out", str(tmp_path / "blur")]) == 0
    plain, blurred = members(tmp_path / "plain" / "00000.tar"), members(tmp_path / "blur" / "00000.tar")

    def image_of(files: dict[str, bytes], stem: str) -> np.ndarray:
        key = next(
            k[:-5]
            for k, v in files.items()
            if k.endswith(".json") and Path(json.loads(v)["url"]).stem == stem
        )
        return np.asarray(Image.open(io.BytesIO(files[f"{key}.jpg"])).convert("L"), dtype=np.float64)

    before, after = image_of(plain, "astronaut"), image_of(blurred, "astronaut")
    box = json.loads(next(v for k, v in blurred.items() if k.endswith(".json") and b"astronaut" in v))[
        "face_boxes"
    ][0]
    face = (slice(box["y"], box["y"] + box["h"]), slice(box["x"], box["x"] + box["w"]))
    detail = lambda a: np.abs(np.diff(a, axis=1)).mean()  # noqa: E731 - mean horizontal gradient
    assert detail(after[face]) < 0.5 * detail(before[face])  # the face lost its detail
    assert np.abs(after[400:, 300:] - before[400:, 300:]).mean() < 2  # far from it: only re-encoding
    # images without a face are written as they were
    assert np.array_equal(image_of(plain, "coffee"), image_of(blurred, "coffee"))


def test_blur_faces_needs_the_faces_stage(tmp_path, capsys):
    run = face_run(tmp_path, stages="  - phash: {}\n")
    assert main(["select", str(run), "--blur-faces", "--out", str(tmp_path / "s")]) == 2
    assert "--blur-faces needs face boxes" in capsys.readouterr().err
    assert (
        main(["select", str(run), "--blur-faces", "--uids-only", "--out", str(tmp_path / "u.parquet")]) == 2
    )
    assert not (tmp_path / "s").exists()
