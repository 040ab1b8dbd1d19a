"""TrainConfig: every bad field is named, and the config survives a JSON round trip."""
import json

import pytest

from isofast.train_config import TrainConfig


def _config(out, **kw):
    base = dict(out_dir=str(out), steps=10, batch_size=8, lr=1e-2, T=50, log_every=5, ckpt_every=5,
                progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("field, value, error", [
    ("iso_lambda", -0.1, ValueError), ("steps", 0, ValueError), ("optimizer", "sgd", ValueError),
    ("precision", "fp8", ValueError), ("grad_accum", 0, ValueError), ("logger", "mlflow", ValueError), ("ema_decay", 1.0, ValueError), ("batch_size", 2.5, TypeError),
    ("schedule", "quadratic", ValueError), ("iso_mode", "token", ValueError), ("lr", 0.0, ValueError),
    ("betas", (0.9, 1.0), ValueError), ("keep_checkpoints", 0, ValueError),
])
def test_config_rejects_bad_values_naming_the_field(tmp_path, field, value, error):
    with pytest.raises(error, match=field):
        _config(tmp_path, **{field: value})


def test_config_round_trips_through_json(tmp_path):
    cfg = _config(tmp_path, betas=(0.8, 0.99), grad_clip=None, iso_lambda=0.3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({**cfg.to_dict(), "epochs": 3})


def test_old_configs_without_grad_accum_or_logger_still_load():
    cfg = TrainConfig(out_dir="x", steps=3)  # the fields added on 2026-11-30 missing, tensorboard recorded
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("grad_accum", "logger")}
    old["tensorboard"] = False
    loaded = TrainConfig.from_dict(old)
    assert loaded.grad_accum == 1 and loaded.logger == "csv"
