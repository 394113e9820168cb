"""CapsNet and BaselineCNN: shapes, parameter counts, gradients, masking, config errors."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from capscore import (
    MODELS,
    ROUTINGS,
    BaselineCNN,
    BaselineCNNConfig,
    CapsNet,
    CapsNetConfig,
    build_model,
    config_from_dict,
    model_kind,
)

# Every registered model family, by its tiny preset, and the tiny CapsNet under every routing:
# a new MODELS / ROUTINGS entry is tested from its first line.
TINY = {kind: (lambda kind=kind: build_model(MODELS[kind].make_config("tiny"))) for kind in MODELS}
TINY.update(
    {
        f"capsnet-{name}": (
            lambda name=name: build_model(CapsNetConfig.tiny(routing={"name": name}))
        )
        for name in ROUTINGS
    }
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mnist_parameter_counts_match_paper():
    model = CapsNet(CapsNetConfig.mnist())
    assert n_params(model) == 8_215_568
    assert n_params(model) - n_params(model.decoder) == 6_804_224
    assert n_params(CapsNet(CapsNetConfig.mnist(decoder=False))) == 6_804_224
    assert CapsNetConfig.mnist().num_primary == 1152


def test_routing_bias_is_opt_in():
    assert n_params(CapsNet(CapsNetConfig.mnist(routing={"bias": True}))) == 8_215_568 + 160


def test_baseline_cnn_parameter_count_matches_paper():
    assert n_params(BaselineCNN(BaselineCNNConfig())) == 35_445_522


@pytest.mark.parametrize(
    "preset, shape, num_primary",
    [
        ("mnist", (1, 28, 28), 1152),
        ("multimnist", (1, 36, 36), 32 * 10 * 10),
        ("cifar10", (3, 32, 32), 64 * 8 * 8),
    ],
)
def test_presets_forward_shapes(preset, shape, num_primary):
    cfg = getattr(CapsNetConfig, preset)()
    model = CapsNet(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.lengths.shape == (2, 10)
    assert out.poses.shape == (2, 10, 16)
    assert out.reconstructions.shape == (2, *shape)
    assert out.coupling.shape == (2, num_primary, 10)
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()
    torch.testing.assert_close(out.coupling.sum(-1), torch.ones(2, num_primary))


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("multi_hot", [False, True])
def test_gradients_reach_every_parameter(kind, multi_hot):
    torch.manual_seed(0)
    model = TINY[kind]()
    images = torch.rand(4, 1, 12, 12)
    targets = torch.tensor([[1.0, 1] + [0] * 8] * 4) if multi_hot else torch.tensor([0, 1, 2, 3])
    out = model(images, targets)
    loss = model.loss(out, images, targets)
    loss.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("kind", sorted(TINY))
def test_zero_input_no_nan(kind):
    model = TINY[kind]()
    images = torch.zeros(3, 1, 12, 12)
    targets = torch.tensor([0, 1, 2])
    out = model(images, targets)
    loss = model.loss(out, images, targets)
    loss.total.backward()
    assert torch.isfinite(out.scores).all() and torch.isfinite(loss.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_capsnet_loss_parts_and_weight():
    torch.manual_seed(1)
    model = CapsNet(CapsNetConfig.tiny(reconstruction_weight=0.0))
    images, targets = torch.rand(2, 1, 12, 12), torch.tensor([3, 4])
    loss = model.loss(model(images, targets), images, targets)
    assert loss.reconstruction == 0
    torch.testing.assert_close(loss.total, loss.margin)


def test_eval_masking_uses_prediction_not_label():
    torch.manual_seed(2)
    model = CapsNet(CapsNetConfig.tiny(weight_init_std=1.0)).eval()  # poses far from zero
    images = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        out = model(images)  # no targets: the decoder sees the predicted (longest) capsule
        predicted = out.lengths.argmax(1)
        with_pred = model(images, predicted)
        other = model(images, (predicted + 1) % 10)
    torch.testing.assert_close(out.reconstructions, with_pred.reconstructions)
    assert not torch.allclose(out.reconstructions, other.reconstructions)


def test_decoder_sees_only_masked_capsule():
    torch.manual_seed(3)
    model = CapsNet(CapsNetConfig.tiny())
    poses = torch.randn(1, 10, 6)
    mask = torch.nn.functional.one_hot(torch.tensor([2]), 10).float()
    changed = poses.clone()
    changed[0, 5] += 10  # an unmasked capsule
    torch.testing.assert_close(model.decoder(poses, mask), model.decoder(changed, mask))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("routing", {"iterations": 0}, "routing.iterations"),
        ("image_size", 10, "image_size"),
        ("reconstruction_weight", -1.0, "reconstruction_weight"),
        ("primary_dim", 0, "primary_dim"),
        ("num_classes", 1, "num_classes"),
        ("m_neg", 0.95, "m_neg"),
        ("margin_lambda", -0.5, "margin_lambda"),
        ("routing", {"name": "nope"}, "routing.name"),
        ("routing", {"iteration": 2}, "iteration"),
        ("routing", "dynamic", "routing"),
    ],
)
def test_capsnet_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        CapsNetConfig(**{field: value})


def test_image_too_small_message_names_sizes():
    with pytest.raises(ValueError, match="image_size=16 is too small"):
        CapsNetConfig(image_size=16)


@pytest.mark.parametrize(
    "field, value",
    [("dropout", 1.0), ("conv_kernel", 4), ("conv_channels", ()), ("num_classes", 0)],
)
def test_cnn_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BaselineCNNConfig(**{field: value})


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_preset_builds_and_round_trips_through_a_dict(kind):
    spec = MODELS[kind]
    assert spec.default_preset in spec.presets
    for preset in spec.presets:
        config = spec.make_config(preset)
        assert type(config) is spec.config and model_kind(config) == kind
        assert isinstance(build_model(config), spec.model)
        assert config_from_dict(kind, json.loads(json.dumps(asdict(config)))) == config


def test_make_config_merges_overrides_into_the_preset():
    config = MODELS["capsnet"].make_config("tiny", {"routing": {"iterations": 1}, "class_dim": 4})
    assert config.routing.iterations == 1 and config.class_dim == 4
    assert config.conv1_channels == CapsNetConfig.tiny().conv1_channels
    assert MODELS["capsnet"].make_config().num_primary == 1152  # default preset: the paper's
    with pytest.raises(ValueError, match="no_such_field"):
        MODELS["capsnet"].make_config("tiny", {"no_such_field": 1})
    with pytest.raises(ValueError, match="preset"):
        MODELS["cnn"].make_config("resnet")


def test_build_model_dispatches_on_the_config_type():
    assert isinstance(build_model(BaselineCNNConfig.tiny()), BaselineCNN)
    assert isinstance(build_model(CapsNetConfig.tiny()), CapsNet)
    with pytest.raises(ValueError, match="no registered model"):
        build_model(object())
    with pytest.raises(ValueError, match="model type"):
        config_from_dict("resnet", {})


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_every_routing_config_names_its_registry_key(name):
    assert ROUTINGS[name].config().name == name


@pytest.mark.slow  # a fresh interpreter (tests/test_import_layers.py is the fast AST check)
def test_capscore_imports_without_ray_webdataset_or_pipeline():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'webdataset', 'pipeline'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import capscore, torch\n"
        "m = capscore.CapsNet(capscore.CapsNetConfig.tiny())\n"
        "out = m(torch.rand(2, 1, 12, 12))\n"
        "assert not any(k.split('.')[0] in ('ray', 'webdataset', 'pipeline') for k in sys.modules)\n"
        "print('ok', tuple(out.lengths.shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "ok (2, 10)" in result.stdout
