"""The model registry: a model's spec as JSON, and the model rebuilt from it."""
import json

import pytest
from torch import nn

from isofast.checkpoint import check_state_dict
from isofast.models import build_model, model_spec_of, parameter_count
from isofast.models.mlp import TimeMLP
from isofast.models.unet import build_unet


def test_model_spec_rebuilds_the_architecture():
    for model in (TimeMLP(hidden=24, n_layers=2, emb_dim=16), build_unet("tiny")):
        spec = model_spec_of(model)
        json.dumps(spec)
        rebuilt = build_model(json.loads(json.dumps(spec)))
        check_state_dict(rebuilt, model.state_dict())
    assert model_spec_of(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model({"kind": "transformer"})


def test_parameter_count_is_exact_and_absurd_sizes_are_refused_before_allocating():
    for model in (TimeMLP(hidden=24, n_layers=2, emb_dim=16), build_unet("tiny")):
        assert parameter_count(model_spec_of(model)) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"about 2\.0e\+12 parameters.*2\^31"):
        build_model({"kind": "mlp", "config": {"hidden": 10**6}})
    unet = model_spec_of(build_unet("tiny"))
    unet["config"]["base_channels"] = 2**16
    with pytest.raises(ValueError, match=r"parameters.*2\^31"):
        build_model(unet)
    with pytest.raises(ValueError, match=r"model spec.*hidden"):
        build_model({"kind": "mlp", "config": {"hidden": -3}})
