"""--precision fp16: the loss scaler skips a step whose gradients overflow, lowers its scale, and is checkpointed."""
import copy
import csv
import math

import pytest
import torch
from torch import nn
from trainer_helpers import assert_bitwise, one_thread, tiny_config, tiny_mlp, toy_points  # noqa: F401 (autouse fixture)

from isofast import checkpoint as ck
from isofast.train import Trainer
from isofast.train_precision import MAX_SKIPPED_IN_A_ROW, MixedPrecision

INIT_SCALE = 2.0 ** 16  # torch.amp.GradScaler's default
pytestmark = pytest.mark.filterwarnings("ignore:precision='fp16' .* on a CPU")  # said once, in its own test


def _scaled_step(mp, model, opt, poison=False):
    opt.zero_grad(set_to_none=True)
    with mp.autocast():
        out = model(torch.ones(4, 3))
    mp.backward(out.float().square().mean())
    if poison:
        model.weight.grad[0, 0] = math.inf  # what an fp16 overflow leaves in a gradient
    mp.unscale(opt)
    return mp.step(opt)


def test_an_inf_gradient_skips_the_step_and_halves_the_scale():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("fp16", torch.device("cpu"))
    before = copy.deepcopy(model.state_dict())
    assert _scaled_step(mp, model, opt, poison=True) is False
    assert_bitwise(before, model.state_dict(), "weights after a skipped step")
    assert mp.scale == INIT_SCALE / 2
    assert _scaled_step(mp, model, opt) is True
    assert not torch.equal(before["weight"], model.weight) and mp.scale == INIT_SCALE / 2
    assert mp.state_dict()["scale"] == INIT_SCALE / 2
    restored = MixedPrecision("fp16", torch.device("cpu"))
    restored.load_state_dict(mp.state_dict())
    assert restored.scale == INIT_SCALE / 2


def test_fp32_and_bf16_have_no_scaler():
    for precision in ("fp32", "bf16"):
        mp = MixedPrecision(precision, torch.device("cpu"))
        assert mp.scaler is None and mp.scale is None and mp.state_dict() is None
    with pytest.raises(ValueError, match="precision must be one of"):
        MixedPrecision("fp8", torch.device("cpu"))


def _poisoned_mlp(times=1):
    """The tiny MLP whose first ``times`` backwards leave an inf in a gradient (then never again)."""
    model = tiny_mlp()
    calls = []

    def poison(grad):
        calls.append(1)
        return torch.full_like(grad, math.inf) if len(calls) <= times else grad

    next(model.parameters()).register_hook(poison)
    return model


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_skipped_fp16_step_is_counted_not_a_crash_and_the_scale_resumes(tmp_path):
    kw = dict(precision="fp16", log_every=1, ckpt_every=1, ema_decay=0.0)
    first = Trainer(_poisoned_mlp(), toy_points(), tiny_config(tmp_path / "run", steps=1, **kw)).fit()
    assert first.step == 1 and first.precision.scale == INIT_SCALE / 2
    assert_bitwise(ck.load_checkpoint(tmp_path / "run").model, tiny_mlp().state_dict(), "weights of the skipped step")
    assert ck.load_checkpoint(tmp_path / "run").state["scaler"]["scale"] == INIT_SCALE / 2

    resumed = Trainer(tiny_mlp(5), toy_points(), tiny_config(tmp_path / "run", steps=3, **kw)).fit(resume=True)
    full = Trainer(_poisoned_mlp(), toy_points(), tiny_config(tmp_path / "full", steps=3, **kw)).fit()
    assert resumed.precision.scale == full.precision.scale == INIT_SCALE / 2  # restored, not a fresh 2^16
    assert_bitwise(full.model.state_dict(), resumed.model.state_dict(), "weights, resumed vs uninterrupted")
    rows = _rows(tmp_path / "full")
    assert [r["skipped_steps"] for r in rows] == ["1", "0", "0"]
    assert rows[0]["loss"] == "" and all(math.isfinite(float(r["loss"])) for r in rows[1:])
    values = ("step", "loss", "mse", "iso_penalty", "skipped_steps")
    assert [[r[k] for k in values] for r in _rows(tmp_path / "run")] == [[r[k] for k in values] for r in rows]
    assert not torch.equal(full.model.out.weight, tiny_mlp().out.weight)  # the later steps trained


def test_an_fp32_checkpoint_has_no_scaler_state(tmp_path):
    Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=1, ckpt_every=1)).fit()
    assert "scaler" not in ck.load_checkpoint(tmp_path).state


def test_fp16_on_a_cpu_runs_and_says_bf16_is_the_cpu_choice(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"--precision fp16.*bf16 is the CPU choice"):
        trainer = Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=2, precision="fp16", device="cpu"))
    trainer.fit()
    assert trainer.step == 2 and trainer.precision.scaler is not None


def test_skipped_steps_without_end_are_a_divergence(tmp_path):
    cfg = tiny_config(tmp_path, steps=MAX_SKIPPED_IN_A_ROW + 5, precision="fp16", log_every=10, ckpt_every=100)
    with pytest.raises(FloatingPointError, match=f"{MAX_SKIPPED_IN_A_ROW} fp16 steps in a row were skipped"):
        Trainer(_poisoned_mlp(times=10**9), toy_points(), cfg).fit()
    # one fewer is the scaler still searching: the run goes on and trains
    cfg = tiny_config(tmp_path / "searching", steps=MAX_SKIPPED_IN_A_ROW + 1, precision="fp16", log_every=10,
                      ckpt_every=100)
    trainer = Trainer(_poisoned_mlp(times=MAX_SKIPPED_IN_A_ROW - 1), toy_points(), cfg).fit()
    assert trainer.step == MAX_SKIPPED_IN_A_ROW + 1 and trainer.precision.skipped_in_a_row == 0
