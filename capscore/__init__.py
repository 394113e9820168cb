"""capscore: Capsule Networks (Sabour, Frosst & Hinton 2017) in plain PyTorch.

A leaf package: it imports torch only, never ray, webdataset or the pipeline.
"""

from capscore.config import BaselineCNNConfig, CapsNetConfig
from capscore.decoder import Decoder, class_mask
from capscore.functional import squash
from capscore.layers import ClassCapsules, PrimaryCapsules
from capscore.losses import LossParts, capsnet_loss, margin_loss, reconstruction_loss
from capscore.models import (
    MODELS,
    BaselineCNN,
    CapsNet,
    CapsNetOutput,
    CNNOutput,
    ModelSpec,
    build_model,
    config_from_dict,
    model_kind,
)
from capscore.routing import (
    ROUTINGS,
    AttentionRouting,
    AttentionRoutingConfig,
    DynamicRouting,
    DynamicRoutingConfig,
    EMRouting,
    EMRoutingConfig,
    RoutingConfig,
    RoutingOutput,
    RoutingSpec,
    UniformRouting,
    UniformRoutingConfig,
    attention_routing,
    build_routing,
    dynamic_routing,
    em_routing,
    routing_config,
)

__all__ = [
    "MODELS",
    "ROUTINGS",
    "AttentionRouting",
    "AttentionRoutingConfig",
    "BaselineCNN",
    "BaselineCNNConfig",
    "CNNOutput",
    "CapsNet",
    "CapsNetConfig",
    "CapsNetOutput",
    "ClassCapsules",
    "DynamicRouting",
    "DynamicRoutingConfig",
    "EMRouting",
    "EMRoutingConfig",
    "ModelSpec",
    "RoutingConfig",
    "RoutingOutput",
    "RoutingSpec",
    "UniformRouting",
    "UniformRoutingConfig",
    "attention_routing",
    "build_routing",
    "config_from_dict",
    "model_kind",
    "routing_config",
    "Decoder",
    "LossParts",
    "PrimaryCapsules",
    "build_model",
    "capsnet_loss",
    "class_mask",
    "dynamic_routing",
    "em_routing",
    "margin_loss",
    "reconstruction_loss",
    "squash",
]
