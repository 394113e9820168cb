"""CapsNet and the paper's baseline CNN, behind one interface.

Both models: ``forward(images, targets=None, *, part_classes=None)`` returns an output whose
``scores`` [B, J] rank the classes, and ``loss(output, images, targets, parts=None)`` returns
``LossParts`` (total + named parts). ``part_classes``/``parts`` carry multi-object data (each
object's class and own image, MultiMNIST); a model without a decoder ignores them.
The pipeline trains and evaluates either without knowing which it has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from capscore.config import (
    CAPSNET_PRESETS,
    CNN_PRESETS,
    BaselineCNNConfig,
    CapsNetConfig,
    merge_overrides,
)
from capscore.decoder import Decoder, class_mask
from capscore.layers import ClassCapsules, PrimaryCapsules
from capscore.losses import LossParts, capsnet_loss, classification_loss


@dataclass
class CapsNetOutput:
    lengths: torch.Tensor
    """[B, J] how present each class is: the capsule lengths |v_j| (dynamic, uniform,
    attention routing) or the routing's own activations a_j in (0, 1) (em)."""
    poses: torch.Tensor
    """[B, J, D] class capsule vectors v_j (em: the unsquashed Gaussian means mu_j)."""
    reconstructions: torch.Tensor | None
    """[B, C, H, W] decoder output, or [B, K, C, H, W] one per object when `part_classes` was
    given (None when the config has no decoder)."""
    coupling: torch.Tensor
    """[B, I, J] final coupling coefficients c_ij."""

    @property
    def scores(self) -> torch.Tensor:
        return self.lengths


@dataclass
class CNNOutput:
    logits: torch.Tensor
    """[B, J] class logits."""
    reconstructions: None = None

    @property
    def scores(self) -> torch.Tensor:
        return self.logits


class CapsNet(nn.Module):
    """conv1 (ReLU) -> PrimaryCaps (squash) -> routing -> class capsules -> masked decoder."""

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        self.config = cfg = config
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.conv1_channels, cfg.conv1_kernel)
        self.primary = PrimaryCapsules(
            cfg.conv1_channels,
            cfg.primary_types,
            cfg.primary_dim,
            cfg.primary_kernel,
            cfg.primary_stride,
        )
        self.classes = ClassCapsules(
            cfg.num_primary,
            cfg.primary_dim,
            cfg.num_classes,
            cfg.class_dim,
            routing=cfg.routing,
            init_std=cfg.weight_init_std,
        )
        image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.decoder = (
            Decoder(cfg.num_classes, cfg.class_dim, cfg.decoder_hidden, image_shape)
            if cfg.decoder
            else None
        )

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        part_classes: torch.Tensor | None = None,
        routing_iterations: int | None = None,
    ) -> CapsNetOutput:
        """Class capsules and reconstructions.

        The decoder sees the capsule(s) of `targets` (training) or the longest one (evaluation).
        With `part_classes` [B, K] (class indices, e.g. MultiMNIST's two digits) it instead
        reconstructs K images per input, the k-th from capsule part_classes[:, k] alone.
        `routing_iterations` runs the routing for that many iterations instead of the config's
        (algorithms with iterations only; e.g. an inference-time sweep).
        """
        h = torch.relu(self.conv1(images))  # [B, 256, 20, 20]
        u_BIP = self.primary(h)  # [B, 1152, 8]
        # Children's activations for routings that weigh votes by them: the primary capsule
        # lengths (in [0, 1) after squash), the vector-capsule reading of "presence".
        a_BI = u_BIP.float().norm(dim=-1) if self.classes.routing.needs_activations else None
        routed = self.classes(
            u_BIP, a_BI, routing_iterations
        )  # poses [B, 10, 16], activations [B, 10], c [B, I, 10]
        v_BJD, lengths_BJ = routed.poses, routed.activations
        recon = None
        if self.decoder is not None:
            if part_classes is not None:
                recon = self.reconstruct(v_BJD, part_classes)
            else:
                recon = self.decoder(v_BJD, class_mask(lengths_BJ, targets).to(v_BJD.dtype))
        return CapsNetOutput(
            lengths=lengths_BJ, poses=v_BJD, reconstructions=recon, coupling=routed.couplings
        )

    def reconstruct(self, poses_BJD: torch.Tensor, classes_BK: torch.Tensor) -> torch.Tensor:
        """[B, K, C, H, W]: image k of sample b decoded from capsule classes_BK[b, k] alone."""
        if self.decoder is None:
            raise ValueError("this CapsNet has no decoder (config.decoder=False)")
        B, J, D = poses_BJD.shape
        K = classes_BK.shape[1]
        mask_BKJ = nn.functional.one_hot(classes_BK.long(), J).to(poses_BJD.dtype)
        poses = poses_BJD.unsqueeze(1).expand(B, K, J, D).reshape(B * K, J, D)
        recon = self.decoder(poses, mask_BKJ.reshape(B * K, J))
        return recon.view(B, K, *recon.shape[1:])

    def loss(
        self,
        out: CapsNetOutput,
        images: torch.Tensor,
        targets: torch.Tensor,
        parts: torch.Tensor | None = None,
    ) -> LossParts:
        """Margin loss + reconstruction loss; with `parts` [B, K, C, H, W] (each object's own
        image, matching `out.reconstructions` from `part_classes`) the reconstruction term is
        the sum over the K objects (MultiMNIST, paper section 6)."""
        cfg = self.config
        return capsnet_loss(
            out.lengths,
            out.reconstructions,
            images if parts is None else parts,
            targets,
            m_pos=cfg.m_pos,
            m_neg=cfg.m_neg,
            lam=cfg.margin_lambda,
            reconstruction_weight=cfg.reconstruction_weight,
        )


class BaselineCNN(nn.Module):
    """The paper's baseline: 3 conv (5x5, same padding, ReLU), FC 328, FC 192, dropout, FC J."""

    def __init__(self, config: BaselineCNNConfig):
        super().__init__()
        self.config = cfg = config
        convs: list[nn.Module] = []
        channels = [cfg.in_channels, *cfg.conv_channels]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            convs += [
                nn.Conv2d(c_in, c_out, cfg.conv_kernel, padding=cfg.conv_kernel // 2),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*convs)
        widths = [channels[-1] * cfg.image_size**2, *cfg.fc_hidden]
        fcs: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            fcs += [nn.Linear(w_in, w_out), nn.ReLU(inplace=True)]
        fcs += [nn.Dropout(cfg.dropout), nn.Linear(widths[-1], cfg.num_classes)]
        self.classifier = nn.Sequential(*fcs)

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        part_classes: torch.Tensor | None = None,
    ) -> CNNOutput:
        """Logits (targets and part_classes are accepted for a common interface, unused)."""
        return CNNOutput(logits=self.classifier(self.features(images).flatten(1)))

    def loss(
        self,
        out: CNNOutput,
        images: torch.Tensor,
        targets: torch.Tensor,
        parts: torch.Tensor | None = None,
    ) -> LossParts:
        return classification_loss(out.logits, targets)


@dataclass(frozen=True)
class ModelSpec:
    """One model family: its module, its config class and named presets of that config."""

    model: type[nn.Module]
    config: type
    presets: dict[str, Callable[..., Any]] = field(default_factory=dict)
    default_preset: str = ""

    @property
    def registries(self) -> dict[str, dict[str, Any]]:
        """Config fields whose value is a config of a registry entry, picked by its "name"
        (CapsNet's `routing` -> ROUTINGS), as {field: registry}."""
        return {
            f.name: f.metadata["registry"]
            for f in dataclasses.fields(self.config)
            if "registry" in f.metadata
        }

    def make_config(self, preset: str | None = None, overrides: dict[str, Any] | None = None):
        """The config of `preset` (default: the paper's) with `overrides` applied (nested
        dicts merged), validated by the config class."""
        name = preset or self.default_preset
        if name not in self.presets:
            raise ValueError(f"preset must be one of {sorted(self.presets)}, got {name!r}")
        base = asdict(self.presets[name]())
        unknown = sorted(set(overrides or {}) - set(base))
        if unknown:
            raise ValueError(
                f"{self.config.__name__} has no field(s) {unknown}; known: {sorted(base)}"
            )
        return self.config(**merge_overrides(base, overrides or {}))


MODELS: dict[str, ModelSpec] = {
    "capsnet": ModelSpec(CapsNet, CapsNetConfig, CAPSNET_PRESETS, default_preset="mnist"),
    "cnn": ModelSpec(BaselineCNN, BaselineCNNConfig, CNN_PRESETS, default_preset="mnist"),
}
"""Model families by name (the pipeline's `model.type`); a new model is one entry."""


def model_kind(config: Any) -> str:
    """The MODELS name of a config object."""
    for kind, spec in MODELS.items():
        if type(config) is spec.config:
            return kind
    raise ValueError(f"no registered model takes a {type(config).__name__}")


def build_model(config: Any) -> nn.Module:
    """The one builder: the model for a config object of any registered family."""
    return MODELS[model_kind(config)].model(config)


def config_from_dict(kind: str, values: dict[str, Any]) -> Any:
    """Rebuild a config saved with dataclasses.asdict (e.g. in a checkpoint)."""
    if kind not in MODELS:
        raise ValueError(f"model type must be one of {sorted(MODELS)}, got {kind!r}")
    return MODELS[kind].config(**values)
