"""Model configs: one keyword-only dataclass per model, validated on construction.

Every field is documented; an impossible value raises ``ValueError`` naming the field, so a
bad YAML override fails before any tensor is allocated (and before Ray starts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capscore.routing import ROUTINGS, DynamicRoutingConfig, RoutingConfig, routing_config


def _conv_out(size: int, kernel: int, stride: int = 1) -> int:
    """Output side of a 'valid' (unpadded) convolution."""
    return (size - kernel) // stride + 1


def _check_positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}"
            )


def _check_non_negative(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 0, got {value!r}")


@dataclass(kw_only=True)
class CapsNetConfig:
    """The CapsNet of Sabour et al. 2017; the defaults are the paper's MNIST network."""

    image_size: int = 28
    """Side of the square input image in pixels."""
    in_channels: int = 1
    """Input image channels (1 for MNIST-like data, 3 for CIFAR-10/SVHN)."""
    num_classes: int = 10
    """Number of class capsules J (one per class)."""
    conv1_channels: int = 256
    """Channels of the first (ReLU) convolution."""
    conv1_kernel: int = 9
    """Kernel side of the first convolution (stride 1, no padding)."""
    primary_types: int = 32
    """Number of primary capsule types (channels of PrimaryCaps = types * primary_dim)."""
    primary_dim: int = 8
    """Pose dimension of a primary capsule."""
    primary_kernel: int = 9
    """Kernel side of the PrimaryCaps convolution."""
    primary_stride: int = 2
    """Stride of the PrimaryCaps convolution."""
    class_dim: int = 16
    """Pose dimension D of a class capsule."""
    routing: RoutingConfig = field(
        default_factory=DynamicRoutingConfig, metadata={"registry": ROUTINGS}
    )
    """Routing between PrimaryCaps and class capsules: a config of a `capscore.ROUTINGS` entry
    (a dict such as {"name": "dynamic", "iterations": 3} is converted)."""
    weight_init_std: float = 0.01
    """Standard deviation of the normal init of the transformation matrices W_ij."""
    decoder: bool = True
    """Build the masked reconstruction decoder."""
    decoder_hidden: tuple[int, ...] = (512, 1024)
    """Hidden widths of the fully connected decoder (ReLU); the output layer is sigmoid."""
    m_pos: float = 0.9
    """Margin loss m+: a present class should have a capsule at least this long."""
    m_neg: float = 0.1
    """Margin loss m-: an absent class should have a capsule at most this long."""
    margin_lambda: float = 0.5
    """Down-weighting of the loss for absent classes."""
    reconstruction_weight: float = 0.0005
    """Scale of the per-image sum of squared reconstruction errors in the total loss."""

    def __post_init__(self) -> None:
        self.decoder_hidden = tuple(self.decoder_hidden)
        self.routing = routing_config(self.routing)  # validated against the ROUTINGS registry
        _check_positive(
            self,
            (
                "image_size",
                "in_channels",
                "conv1_channels",
                "conv1_kernel",
                "primary_types",
                "primary_dim",
                "primary_kernel",
                "primary_stride",
                "class_dim",
            ),
        )
        if self.num_classes < 2:
            raise ValueError(f"CapsNetConfig.num_classes must be >= 2, got {self.num_classes!r}")
        if not self.decoder_hidden or any(int(h) < 1 for h in self.decoder_hidden):
            raise ValueError(
                f"CapsNetConfig.decoder_hidden must be positive widths, got {self.decoder_hidden!r}"
            )
        _check_non_negative(
            self, ("weight_init_std", "m_neg", "margin_lambda", "reconstruction_weight")
        )
        if not 0 <= self.m_neg < self.m_pos <= 1:
            raise ValueError(
                f"CapsNetConfig.m_pos/m_neg need 0 <= m_neg < m_pos <= 1, got {self.m_pos}/{self.m_neg}"
            )
        after_conv1 = _conv_out(self.image_size, self.conv1_kernel)
        if after_conv1 < self.primary_kernel:
            raise ValueError(
                f"CapsNetConfig.image_size={self.image_size} is too small: conv1 (kernel "
                f"{self.conv1_kernel}) leaves {after_conv1}px, less than primary_kernel={self.primary_kernel}"
            )

    @property
    def primary_grid(self) -> int:
        """Side of the PrimaryCaps grid (6 for the MNIST network)."""
        after_conv1 = _conv_out(self.image_size, self.conv1_kernel)
        return _conv_out(after_conv1, self.primary_kernel, self.primary_stride)

    @property
    def num_primary(self) -> int:
        """Number of input capsules I (1,152 for the MNIST network)."""
        return self.primary_types * self.primary_grid**2

    @classmethod
    def mnist(cls, **overrides) -> CapsNetConfig:
        """The paper's 28x28 MNIST network: 8,215,568 parameters (6,804,224 without decoder)."""
        return cls(**overrides)

    @classmethod
    def multimnist(cls, **overrides) -> CapsNetConfig:
        """36x36 overlapping-digit MultiMNIST (paper section 6)."""
        return cls(**{"image_size": 36, **overrides})

    @classmethod
    def cifar10(cls, **overrides) -> CapsNetConfig:
        """32x32x3 CIFAR-10; the paper used 64 primary capsule types there."""
        return cls(**{"image_size": 32, "in_channels": 3, "primary_types": 64, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> CapsNetConfig:
        """A few-thousand-parameter network on 12x12 inputs for tests and debugging."""
        base = dict(
            image_size=12,
            conv1_channels=8,
            conv1_kernel=3,
            primary_types=4,
            primary_dim=4,
            primary_kernel=3,
            primary_stride=2,
            class_dim=6,
            decoder_hidden=(16, 32),
        )
        return cls(**{**base, **overrides})


@dataclass(kw_only=True)
class BaselineCNNConfig:
    """The paper's baseline CNN: 3 conv layers (5x5, stride 1, same padding), 2 FC, dropout."""

    image_size: int = 28
    """Side of the square input image in pixels."""
    in_channels: int = 1
    """Input image channels."""
    num_classes: int = 10
    """Number of output classes."""
    conv_channels: tuple[int, ...] = (256, 256, 128)
    """Channels of the convolutions (ReLU, same padding, no pooling)."""
    conv_kernel: int = 5
    """Kernel side of every convolution."""
    fc_hidden: tuple[int, ...] = (328, 192)
    """Widths of the fully connected hidden layers (ReLU)."""
    dropout: float = 0.5
    """Dropout probability before the output layer."""

    def __post_init__(self) -> None:
        self.conv_channels = tuple(self.conv_channels)
        self.fc_hidden = tuple(self.fc_hidden)
        _check_positive(self, ("image_size", "in_channels", "conv_kernel"))
        if self.num_classes < 2:
            raise ValueError(
                f"BaselineCNNConfig.num_classes must be >= 2, got {self.num_classes!r}"
            )
        if self.conv_kernel % 2 == 0:
            raise ValueError(
                f"BaselineCNNConfig.conv_kernel must be odd for same padding, got {self.conv_kernel}"
            )
        for name in ("conv_channels", "fc_hidden"):
            widths = getattr(self, name)
            if not widths or any(int(w) < 1 for w in widths):
                raise ValueError(
                    f"BaselineCNNConfig.{name} must be positive widths, got {widths!r}"
                )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"BaselineCNNConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def tiny(cls, **overrides) -> BaselineCNNConfig:
        """A small CNN on 12x12 inputs for tests."""
        base = dict(image_size=12, conv_channels=(8, 8, 4), conv_kernel=3, fc_hidden=(16, 8))
        return cls(**{**base, **overrides})


CAPSNET_PRESETS: dict[str, Callable[..., CapsNetConfig]] = {
    "mnist": CapsNetConfig.mnist,
    "multimnist": CapsNetConfig.multimnist,
    "cifar10": CapsNetConfig.cifar10,
    "tiny": CapsNetConfig.tiny,
}
"""CapsNetConfig presets by name (`model.preset`); each takes field overrides."""

CNN_PRESETS: dict[str, Callable[..., BaselineCNNConfig]] = {
    "mnist": BaselineCNNConfig,
    "tiny": BaselineCNNConfig.tiny,
}
"""BaselineCNNConfig presets by name: the paper's MNIST baseline, and a tiny test network."""


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` (a config as a dict) with `overrides` applied, nested dicts merged key by key.

    A nested config that names another registry entry (a different "name") is replaced, not
    merged: the keys of one routing algorithm mean nothing to another.
    """
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("name", old.get("name")) == old.get("name")
        ):
            out[key] = merge_overrides(old, value)
        else:
            out[key] = value
    return out
