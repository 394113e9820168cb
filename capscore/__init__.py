"""capscore: Capsule Networks (Sabour, Frosst & Hinton 2017) in plain PyTorch.

A leaf package: it imports torch only, never ray, webdataset or the pipeline.
"""

from capscore.config import BaselineCNNConfig, CapsNetConfig
from capscore.decoder import Decoder, class_mask
from capscore.layers import ClassCapsules, PrimaryCapsules, squash
from capscore.losses import LossParts, capsnet_loss, margin_loss, reconstruction_loss
from capscore.models import MODELS, BaselineCNN, CapsNet, CapsNetOutput, CNNOutput, build_model
from capscore.routing import ROUTINGS, dynamic_routing

__all__ = [
    "MODELS",
    "ROUTINGS",
    "BaselineCNN",
    "BaselineCNNConfig",
    "CNNOutput",
    "CapsNet",
    "CapsNetConfig",
    "CapsNetOutput",
    "ClassCapsules",
    "Decoder",
    "LossParts",
    "PrimaryCapsules",
    "build_model",
    "capsnet_loss",
    "class_mask",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "squash",
]
