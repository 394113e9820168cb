"""What capscore exposes for the pipeline: each routing's keys, and iterations per forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from capscore import MODELS, ROUTINGS, CapsNet, CapsNetConfig


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_keys_are_the_config_fields(name):
    spec = ROUTINGS[name]
    assert spec.keys[0] == "name"
    assert set(spec.keys) == {f.name for f in dataclasses.fields(spec.config)}
    assert spec.has_iterations == ("iterations" in spec.keys)


def test_registries_come_from_field_metadata():
    assert MODELS["capsnet"].registries == {"routing": ROUTINGS}
    assert MODELS["cnn"].registries == {}


@pytest.mark.parametrize("name", [n for n in sorted(ROUTINGS) if ROUTINGS[n].has_iterations])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_iterations_per_forward_equal_a_model_built_with_them(name, r):
    """A model run with routing_iterations=r equals the same weights built with iterations=r."""
    torch.manual_seed(0)
    base = CapsNetConfig.tiny(routing={"name": name, "iterations": 3}, weight_init_std=0.5)
    model = CapsNet(base).double()
    other = CapsNet(
        dataclasses.replace(base, routing=dataclasses.replace(base.routing, iterations=r))
    ).double()
    other.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    got, want = model(x, routing_iterations=r), other(x)
    torch.testing.assert_close(got.lengths, want.lengths, rtol=0, atol=0)
    torch.testing.assert_close(got.coupling, want.coupling, rtol=0, atol=0)
    assert model.config.routing.iterations == 3  # nothing was patched


@pytest.mark.parametrize("name", [n for n in sorted(ROUTINGS) if not ROUTINGS[n].has_iterations])
def test_iterations_for_an_algorithm_without_them_is_an_error(name):
    model = CapsNet(CapsNetConfig.tiny(routing={"name": name}))
    with pytest.raises(ValueError, match="no iterations"):
        model(torch.rand(1, 1, 12, 12), routing_iterations=2)
