"""Hostile and everyday configs: YAML aliases, numbers as users type them, NaN/infinity, model files.

Every refusal is one `curate` exit 2 naming the key (or the file and line), never a traceback.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from curation.cli import main
from curation.config import Config, InputConfig, StageSpec, parse_config
from curation.core.params import ConfigError, param_problems
from curation.stages import STAGES
from curation.stages.caption import ComplexityParams
from tests.helpers import LAION_1K, write_config


def billion_laughs(levels: int) -> str:
    """`levels` anchors, each a list of ten aliases of the previous one: 10**levels leaves from ~400 bytes."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


HOSTILE_YAML = {
    "laughs": (billion_laughs(7), "line 2", "aliases (*l0) are not accepted"),
    "recursive": ("input: &a [*a]\n", "line 1", "aliases (*a) are not accepted"),
    "merge_key": ("base: &b {x: 1}\ninput:\n  <<: *b\n", "line 3", "aliases (*b) are not accepted"),
    "deep": ("input: " + "[" * 5000 + "]" * 5000 + "\n", "malformed YAML", "nested too deeply"),
}


@pytest.mark.parametrize("command", ["validate", "run", "train", "mine"])
@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_one_line_refusal_in_every_command(tmp_path, capsys, command, case):
    text, where, what = HOSTILE_YAML[case]
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(text)
    assert main([command, str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and where in err and what in err, err
    assert "Traceback" not in err


def test_anchors_without_aliases_are_fine(tmp_path):
    cfg = parse_config(
        f"input: &i {{path: {LAION_1K}, url_column: URL, caption_column: TEXT}}\noutput: {tmp_path}/o\n"
        "stages: [caption_complexity]\n",
        stages=STAGES,
    )
    assert cfg.input.url_column == "URL"


def test_numbers_as_users_type_them(tmp_path):
    cfg = parse_config(
        f"input: {{path: {LAION_1K}, rows_per_shard: 100}}\noutput: {tmp_path}/o\nstages:\n"
        "  - caption_language: {min_score: 5e-1}\n"
        "  - image_size: {max_aspect_ratio: 2.5E+0}\n"
        "  - text_spotting: {max_overlap: 4.e-1, mag_ratio: 1e0}\n",
        stages=STAGES,
    )
    lang, size, ocr = (s.params for s in cfg.stages)
    assert lang.min_score == 0.5 and size.max_aspect_ratio == 2.5
    assert ocr.max_overlap == pytest.approx(0.4) and ocr.mag_ratio == 1.0
    # A key typed as a string is not read as a number because it looks like one: it is refused.
    with pytest.raises(
        ConfigError, match=r"input.caption_column \(line 1\): expected a string, got 100000.0"
    ):
        parse_config(
            "input: {path: x, caption_column: 1e5}\noutput: o\nstages: [caption_action]\n", stages=STAGES
        )


@pytest.mark.parametrize(
    ("stage", "key", "value", "message"),
    [
        ("caption_language", "min_score", ".nan", "must be a finite number, got nan"),
        ("image_size", "max_aspect_ratio", ".inf", "must be a finite number, got inf"),
        ("text_spotting", "max_overlap", "-.inf", "must be a finite number, got -inf"),
        ("clip_score", "min", "1e400", "must be a finite number, got inf"),
        ("text_spotting", "max_overlap", "1.5", "must be >= 0 and <= 1, got 1.5"),
        ("caption_length", "max_words", "1", "must be >= min_words (3), got 1"),
        ("download", "timeout", "0", "must be >= 1, got 0"),
    ],
)
def test_every_number_is_finite_and_in_range_or_refused_with_its_key(
    tmp_path, capsys, stage, key, value, message
):
    cfg = write_config(
        tmp_path / "c.yaml", LAION_1K, tmp_path / "o", stages=f"  - {stage}: {{{key}: {value}}}\n"
    )
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"stages[0].{stage}.{key} (line 10): {message}" in err, err


def test_every_stage_default_satisfies_its_own_declarations():
    for name, cls in STAGES.items():
        assert param_problems(cls.Params()) == [], name


def test_library_caller_cannot_skip_the_declarations(tmp_path):
    """execute(Config(...)) built in code is held to the same ranges as a YAML config."""
    from curation.engine import execute

    bad = dataclasses.replace(ComplexityParams(), min=-1, max_chars=0)
    cfg = Config(
        input=InputConfig(path=str(LAION_1K), url_column="URL", caption_column="TEXT"),
        output=str(tmp_path / "o"),
        stages=[StageSpec("caption_complexity", bad, ("stages", 0, "caption_complexity"))],
    )
    with pytest.raises(ConfigError) as e:
        execute(cfg)
    assert e.value.errors == [
        "stages[0].caption_complexity.min: must be >= 0, got -1",
        "stages[0].caption_complexity.max_chars: must be >= 1, got 0",
    ]
    assert not (tmp_path / "o" / "manifests").exists()


def test_reading_a_config_imports_no_stage():
    import subprocess
    import sys

    code = (
        "import sys, train.config, curation.core.params; "
        "print(sorted(m for m in sys.modules if m.startswith('curation.stages')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- model files


def _pickle_payload_checkpoint(path):
    """A checkpoint whose unpickling would run code: weights-only loading must refuse it."""

    class Payload:
        def __reduce__(self):
            return (print, ("pickle payload ran",))

    torch.save({"state_dict": Payload()}, path)


def _stage_config(tmp_path, stage_yaml: str):
    img = tmp_path / "imgs"
    img.mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img / "a.jpg")
    (img / "a.txt").write_text("a photo")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input: {{format: image_folder, path: {img}}}\noutput: {tmp_path / 'o'}\nstages:\n{stage_yaml}"
    )
    return cfg


def test_validate_checks_every_model_file_a_pipeline_names(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.ftz"
    corrupt.write_bytes(b"\x00" * 64)
    teacher = tmp_path / "teacher.pt"
    _pickle_payload_checkpoint(teacher)
    ocr = tmp_path / "ocr"
    ocr.mkdir()
    for name in ("craft_mlt_25k.pth", "english_g2.pth"):
        (ocr / name).write_bytes(b"not a checkpoint")
    cfg = _stage_config(
        tmp_path,
        f"  - caption_language: {{model: {corrupt}}}\n"
        f"  - concepts: {{checkpoint: {teacher}}}\n"
        f"  - text_spotting: {{model_dir: {ocr}}}\n",
    )
    assert main(["validate", str(cfg)]) == 2
    out = capsys.readouterr()
    err = out.err
    assert "pickle payload ran" not in out.out + err
    assert f"stages[0].caption_language (line 4): cannot load fastText model {corrupt}" in err
    assert f"stages[1].concepts (line 5): cannot read checkpoint {teacher}: it holds a pickle payload" in err
    assert f"stages[2].text_spotting (line 6): cannot read checkpoint {ocr / 'craft_mlt_25k.pth'}" in err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert all(line.startswith(("curate", "  - ", str(cfg))) for line in err.strip().splitlines())


def test_packaged_models_validate_ok(tmp_path, capsys):
    cfg = _stage_config(tmp_path, "  - caption_language: {}\n  - concepts: {}\n  - text_spotting: {}\n")
    assert main(["validate", str(cfg)]) == 0, capsys.readouterr().err


HF_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
    "text_cfg": {"hf_model_name": "bert-base-uncased", "hf_tokenizer_name": "bert-base-uncased"},
}


def test_open_clip_config_naming_a_hugging_face_text_tower_is_refused(tmp_path, capsys):
    import json

    hf = tmp_path / "hf-tower.json"
    hf.write_text(json.dumps(HF_MODEL))
    ck = tmp_path / "ck.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, ck)
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("cat\ndog\n")
    cfg = _stage_config(
        tmp_path,
        f"  - clip_score: {{checkpoint: {ck}, model: {hf}}}\n"
        f"  - concepts: {{teacher: open_clip, model: {hf}, checkpoint: {ck}, vocabulary: {vocabulary}}}\n",
    )
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    refusal = "text_cfg.hf_model_name names a Hugging Face model"
    assert f"stages[0].clip_score (line 4): {hf}: {refusal}" in err
    assert f"stages[1].concepts (line 5): {hf}: {refusal}" in err
    assert main(["eval", "--model", str(hf), "--retrieval", str(tmp_path / "none.tar")]) == 2
    assert refusal in capsys.readouterr().err


def test_hostile_inputs_leave_no_partial_output(tmp_path):
    """Refused configs write nothing (a run directory appears only for a config that checks out)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(billion_laughs(6) + f"output: {tmp_path / 'o'}\n")
    assert main(["run", str(cfg)]) == 2
    assert not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_command_line_numbers_use_the_same_declarations(tmp_path, capsys):
    """`curate dedup` options are DedupParams fields: the same ranges, NaN refused, every problem at once."""
    assert main(["dedup", str(tmp_path), "--radius", "20", "--eps", "nan", "--iterations", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error: --radius: must be >= 0 and <= 16, got 20")
    assert "--eps: must be a finite number, got nan" in err and "--iterations: must be >= 1, got 0" in err
