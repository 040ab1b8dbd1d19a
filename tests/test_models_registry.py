"""The model registry: a model's spec as JSON, and the model rebuilt from it."""
import json

import pytest
from torch import nn

from isofast.checkpoint import check_state_dict
from isofast.models import build_model, model_spec_of
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
