"""open_clip models from local files only: build, load a checkpoint, check one fits, embed.

The one place curate turns an open_clip checkpoint into a model (the clip_score
stage, the concepts stage's open_clip teacher, mining's encoders, training and
evaluation all come here), so checkpoints stay loadable by open_clip itself and
nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from curation.core.storage import is_url, open_store
from curation.models.checkpoints import torch_load

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def _register_packaged_configs() -> None:
    """Make "curate-tiny" (and any JSON under curation/models/model_configs) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def resolve_model_name(name: str) -> str:
    """An open_clip name as is; a path to a JSON model config is registered and named by its stem."""
    import open_clip

    from curation.models.files import open_clip_config_problem

    _register_packaged_configs()
    if refused := open_clip_config_problem(name):
        raise ValueError(refused)
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {name}")
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {name!r}; a JSON config path also works. Known: {open_clip.list_models()}"
        )
    return name


@dataclass
class BuiltModel:
    model: torch.nn.Module
    name: str  # the name open_clip knows it by
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


# ImageNet initialisations of an image tower (`build_model(image_init=...)`), from weights already on disk.
IMAGE_INITS = ("efficientnet_lite0",)


def build_model(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    image_init: str | None = None,
    lock_image: bool = False,
) -> BuiltModel:
    """Random init, or weights from a local checkpoint file (open_clip state dict or a curate checkpoint).

    `image_init` loads ImageNet weights into the image tower's trunk (`init_image_tower`); `lock_image`
    freezes that trunk (`lock_image_tower`). The model is created in fp32; bf16/amp training uses
    autocast, so the master weights stay fp32.
    """
    import open_clip

    resolved = resolve_model_name(name)
    if pretrained is not None and not Path(pretrained).is_file():
        # open_clip would treat an unknown string as a pretrained *tag* and download it; we never do.
        raise FileNotFoundError(f"pretrained must be a local checkpoint file, got {pretrained!r}")
    with _QuietRandomInit():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            resolved, pretrained=pretrained, device=device, output_dict=True, **_timm_normalisation(resolved)
        )
    if image_init is not None:
        init_image_tower(model, image_init)
    if lock_image:
        lock_image_tower(model)
    return BuiltModel(model, resolved, preprocess_train, preprocess_val, open_clip.get_tokenizer(resolved))


def _timm_normalisation(resolved: str) -> dict:
    """A timm image tower sees images normalised as timm trained that architecture (EfficientNet-Lite0:
    mean = std = 0.5, bicubic), not with open_clip's OpenAI default; keyed by the model name, so training
    and evaluation agree."""
    import open_clip

    cfg = (open_clip.get_model_config(resolved) or {}).get("vision_cfg", {})
    if not cfg.get("timm_model_name"):
        return {}
    import timm

    timm_cfg = timm.models.get_pretrained_cfg(cfg["timm_model_name"])
    if timm_cfg is None:
        return {}
    return {
        "image_mean": tuple(timm_cfg.mean),
        "image_std": tuple(timm_cfg.std),
        "image_interpolation": timm_cfg.interpolation,
    }


def _timm_architecture(model: torch.nn.Module) -> str | None:
    from open_clip.timm_model import TimmModel

    visual = getattr(model, "visual", None)
    if not isinstance(visual, TimmModel):
        return None
    return visual.trunk.pretrained_cfg.get("architecture")


def init_image_tower(model: torch.nn.Module, init: str) -> None:
    """Load the `concepts` teacher's EfficientNet-Lite0 ImageNet weights into the image tower's trunk
    (every tensor but the classifier; the projection onto the joint space stays as initialised).

    Refuses a model whose image tower is not timm's `tf_efficientnet_lite0` (the config `curate-lite0`)
    and, with the reason, a machine without the package that ships the weights."""
    from curation.models.efficientnet_lite0 import TeacherError, efficientnet_lite0_imagenet

    if init not in IMAGE_INITS:
        raise ValueError(f"image_init must be one of {', '.join(IMAGE_INITS)} (got {init!r})")
    found = _timm_architecture(model)
    if found != "tf_efficientnet_lite0":
        raise ValueError(
            f"image_init {init}: the model's image tower is {found or 'not a timm model'}, not timm's "
            "tf_efficientnet_lite0 (use model curate-lite0)"
        )
    try:
        teacher = efficientnet_lite0_imagenet()
    except TeacherError as e:
        raise ValueError(f"image_init {init}: {e}") from None
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(state, strict=True)


def lock_image_tower(model: torch.nn.Module) -> None:
    """LiT: freeze a timm image tower's trunk (no gradients; BatchNorm keeps the statistics it was loaded
    with, also under `model.train()`); its projection onto the joint space still trains."""
    import types

    if _timm_architecture(model) is None:
        raise ValueError("lock_image: only a timm image tower can be locked (e.g. model curate-lite0)")
    trunk = model.visual.trunk
    trunk.requires_grad_(False)
    # The trunk ignores train(True): batch statistics would move its running means and give the frozen
    # network other features in training than at evaluation.
    trunk.train = types.MethodType(_always_eval, trunk)
    trunk.eval()


def _always_eval(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return torch.nn.Module.train(self, False)


class _QuietRandomInit(logging.Filter):
    """Random init is the normal case here, not a warning: drop that one root-logger line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self)


def embed_dim(built: BuiltModel) -> int:
    """Width of the joint embedding space (the image and text features)."""
    import open_clip

    cfg = open_clip.get_model_config(built.name)
    if cfg is None or "embed_dim" not in cfg:
        raise ValueError(f"open_clip has no config with embed_dim for model {built.name!r}")
    return int(cfg["embed_dim"])


def load_for_eval(checkpoint: str | None, model_name: str | None = None, device: str = "cpu") -> BuiltModel:
    """A curate checkpoint knows its model name; an open_clip state dict needs `model_name`.

    `checkpoint` may be a URL (s3://...): open_clip loads from a file, so that one object is
    copied through the storage layer into a temporary folder, removed once the weights are loaded.
    """
    if checkpoint is not None and is_url(checkpoint):
        folder, _, file_name = checkpoint.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="curate-checkpoint-") as tmp:
            [local] = open_store(folder).get_to_local([file_name], Path(tmp))
            return load_for_eval(str(local), model_name, device)
    name = model_name
    if checkpoint is not None and name is None:
        ck = torch_load(checkpoint)  # memory-mapped: only the name is read here
        name = ck.get("model_name") if isinstance(ck, dict) else None
        if name is None:
            raise ValueError(f"{checkpoint} does not name its model; pass --model")
    if name is None:
        raise ValueError("give a checkpoint or a model name")
    built = build_model(name, checkpoint, device=device)
    built.model.eval()
    return built


@torch.no_grad()
def encode_images(
    built: BuiltModel, images: Sequence, batch_size: int = 256, device: str = "cpu"
) -> torch.Tensor:
    """`images`: PIL images (or uint8 HxW arrays); returns L2-normalised embeddings."""
    from PIL import Image

    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        pils = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in chunk]
        x = torch.stack([built.preprocess_val(im.convert("RGB")) for im in pils]).to(device)
        out.append(F.normalize(built.model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(
    built: BuiltModel, texts: Sequence[str], batch_size: int = 512, device: str = "cpu"
) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = built.tokenizer(list(texts[i : i + batch_size])).to(device)
        out.append(F.normalize(built.model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


def zero_shot_classifier(
    built: BuiltModel, classnames: Sequence[str], templates: Sequence[str], device: str = "cpu"
) -> torch.Tensor:
    """[D, C]: per class, the renormalised mean of its prompt embeddings (CLIP's prompt ensembling)."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(built, prompts, device=device).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1).T


# Tensors open_clip resizes while loading (resize_pos_embed, resize_text_pos_embed), so a shape
# difference there does not stop a checkpoint from loading.
_RESIZED_ON_LOAD = ("visual.positional_embedding", "positional_embedding")


def checkpoint_problems(checkpoint: str, name: str | None = None) -> list[str]:
    """Why `checkpoint` would not load into model `name` (empty: it loads), found without loading weights.

    The checkpoint is memory-mapped and the model built on the meta device, so this
    costs milliseconds even for large models: callers run it before any work.
    `name` None means the model name stored in a `curate train` checkpoint.
    """
    import open_clip

    path = Path(checkpoint)
    if not path.is_file():
        return [f"checkpoint not found: {checkpoint}"]
    try:
        ck = torch_load(path)
    except Exception as e:
        from curation.models.files import load_error_line

        return [f"cannot read checkpoint {checkpoint}: {load_error_line(e)}"]
    state = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return [f"{checkpoint} is neither a `curate train` checkpoint nor an open_clip state dict"]
    name = name or (ck.get("model_name") if isinstance(ck, dict) else None)
    if name is None:
        return [
            f"{checkpoint} does not name its model (an open_clip state dict): set model to a name or JSON"
        ]
    try:
        resolved = resolve_model_name(name)
    except (ValueError, FileNotFoundError) as e:
        return [str(e).split("; a JSON config path also works")[0] + " (nor a JSON config path)"]
    with _QuietRandomInit():
        expected = open_clip.create_model(resolved, device="meta").state_dict()
    if next(iter(state), "").startswith("module."):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}

    towers: dict[str, list[str]] = {}
    for key in sorted(set(state) | set(expected)):
        have, want = state.get(key), expected.get(key)
        if have is not None and want is not None:
            if tuple(have.shape) == tuple(want.shape) or key in _RESIZED_ON_LOAD:
                continue
            if have.numel() == want.numel() and key in ("logit_scale", "logit_bias"):
                continue  # open_clip reshapes scalar <-> 1-d on load
            what = f"{key} {list(have.shape)} in checkpoint, {list(want.shape)} in model"
        elif want is None:
            what = f"{key} only in checkpoint"
        elif key == "logit_bias":
            continue  # open_clip fills a missing logit_bias with zeros
        else:
            what = f"{key} missing from checkpoint"
        tower = "image tower" if key.startswith("visual.") else "text tower"
        towers.setdefault(tower, []).append(what)
    problems = []
    for tower, diffs in sorted(towers.items()):
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        problems.append(f"{checkpoint} does not fit model {name!r}: {tower} differs ({shown})")
    return problems
