"""Gradient accumulation: N micro-batches of b take the step one batch of N b takes, once per optimizer step."""
import copy
import csv
import json

import pytest
import torch
from trainer_helpers import assert_bitwise, one_thread, tiny_config, tiny_mlp, toy_points  # noqa: F401 (autouse fixture)

from isofast import NoiseKey, NoiseSchedule, reference
from isofast import checkpoint as ck
from isofast.cli import main as cli_main
from isofast.data.order import epoch_permutation, make_noise_generator
from isofast.distributed import micro_batch_rows, read_rows
from isofast.train import Trainer


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"{what}: {k}")


# Every per-sample term is exact under accumulation: the mse alone (lambda 0, either mode) and the "sample"
# penalty. (The "batch" penalty is per micro-batch: the next test.)
@pytest.mark.parametrize("iso_lambda, iso_mode", [(0.0, "batch"), (0.7, "sample")])
def test_n_micro_batches_of_b_equal_one_batch_of_n_b(tmp_path, iso_lambda, iso_mode):
    # 5 steps of 16 on 40 points cross an epoch; the warm-up and EMA must advance once per optimizer step,
    # the clipping act on the accumulated gradient.
    common = dict(steps=5, lr=1e-2, warmup_steps=3, ema_decay=0.9, grad_clip=0.5, iso_lambda=iso_lambda,
                  iso_mode=iso_mode, log_every=5, ckpt_every=5, seed=2)
    accum = Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path / "accum", batch_size=4, grad_accum=4, **common)).fit()
    whole = Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path / "whole", batch_size=16, **common)).fit()
    assert accum.step == whole.step == 5
    _assert_close(accum.model.state_dict(), whole.model.state_dict(), "weights")
    _assert_close(accum.ema_model.state_dict(), whole.ema_model.state_dict(), "EMA")
    # the logged batch penalty is each micro-batch's (logged, unweighted, even at lambda 0): equal in "sample" mode only
    logged = ("loss", "mse", "isotropy", "grad_norm", "lr") + (("iso_penalty",) if iso_mode == "sample" else ())
    for got, want in zip(_rows(tmp_path / "accum"), _rows(tmp_path / "whole"), strict=True):
        for k in logged:
            assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5, abs=1e-7), k
        assert got["images_per_s"] != "" and float(got["images_per_s"]) > 0
    assert not torch.equal(accum.model.out.weight, tiny_mlp().out.weight)  # it trained


def test_batch_penalty_is_each_micro_batch_s(tmp_path):
    """iso_mode "batch" with N micro-batches: the gradient of the mean over micro-batches of each one's batch
    loss (its own penalty (mean s - 1)^2), which is not the penalty of the step's whole batch."""
    data, lam, lr, b, n = toy_points(), 0.7, 1e-2, 4, 3
    model = tiny_mlp()
    ref_model = copy.deepcopy(model)
    cfg = tiny_config(tmp_path / "accum", steps=1, batch_size=b, grad_accum=n, lr=lr, grad_clip=None, ema_decay=0.0,
                      iso_lambda=lam, iso_mode="batch", seed=3)
    Trainer(model, data, cfg).fit()

    gen = make_noise_generator(cfg.seed)
    x0 = data[epoch_permutation(len(data), cfg.seed, 0)[: b * n]]
    t = torch.randint(0, cfg.T, (b * n,), generator=gen)
    eps = NoiseKey.draw(x0.shape, generator=gen).materialize()
    x_t = reference.q_sample(x0, t, NoiseSchedule.linear(cfg.T), eps)
    losses = [reference.iso_ddpm_loss(ref_model(x_t[m * b:(m + 1) * b], t[m * b:(m + 1) * b]), eps[m * b:(m + 1) * b],
                                      lam, "batch")[0] for m in range(n)]
    opt = torch.optim.Adam(ref_model.parameters(), lr=lr)
    torch.stack(losses).mean().backward()
    opt.step()
    # the trainer leaves the last step's gradients in place (it zeroes them at the start of a step)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    whole = Trainer(tiny_mlp(), data, tiny_config(tmp_path / "whole", steps=1, batch_size=b * n, lr=lr, grad_clip=None,
                                                  ema_decay=0.0, iso_lambda=lam, iso_mode="batch", seed=3)).fit()
    gap = (model.out.weight.grad - whole.model.out.weight.grad).abs().max()
    assert gap > 1e-4  # the penalty of the whole batch of 12 is another objective


def test_a_resumed_accumulating_run_equals_an_uninterrupted_one(tmp_path):
    kw = dict(batch_size=4, grad_accum=3, iso_lambda=0.3, ckpt_every=2, log_every=2)
    Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path / "run", steps=3, **kw)).fit()
    resumed = Trainer(tiny_mlp(99), toy_points(), tiny_config(tmp_path / "run", steps=7, **kw)).fit(resume=True)
    full = Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path / "full", steps=7, **kw)).fit()
    assert_bitwise(full.model.state_dict(), resumed.model.state_dict(), "model")
    assert_bitwise(full.ema_model.state_dict(), resumed.ema_model.state_dict(), "EMA")
    assert [r["step"] for r in _rows(tmp_path / "run")] == [r["step"] for r in _rows(tmp_path / "full")]


def test_micro_batch_rows_shard_each_micro_batch_over_ranks():
    assert micro_batch_rows(6, 1, 0, 1) == [slice(0, 6)]
    assert micro_batch_rows(6, 3, 1, 2) == [slice(3, 6), slice(9, 12), slice(15, 18)]
    assert read_rows(micro_batch_rows(6, 3, 0, 1)) == slice(0, 18)
    assert read_rows(micro_batch_rows(6, 2, 1, 2)).tolist() == [3, 4, 5, 9, 10, 11]
    with pytest.raises(ValueError, match="grad_accum must be an int >= 1"):
        micro_batch_rows(6, 0, 0, 1)


def test_bad_grad_accum_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(ValueError, match="TrainConfig.grad_accum must be >= 1, got 0"):
        tiny_config(tmp_path, grad_accum=0)
    with pytest.raises(TypeError, match="TrainConfig.grad_accum must be an int"):
        tiny_config(tmp_path, grad_accum=2.0)
    with pytest.raises(ValueError, match=r"batch_size \* grad_accum = 8 \* 6 = 48 .* exceeds the dataset size 40"):
        Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, grad_accum=6))
    with pytest.raises(SystemExit):
        cli_main(["train", "--grad-accum", "0", "--out", str(tmp_path / "x")])
    assert "--grad-accum: must be >= 1, got 0" in capsys.readouterr().err


def _cli(out, *extra):
    return cli_main(["train", "--data", "swiss_roll", "--n-points", "64", "--batch-size", "8", "--T", "20",
                     "--mlp-hidden", "16", "--log-every", "2", "--ckpt-every", "2", "--logger", "csv",
                     "--no-progress", "--out", str(out), *extra])


def test_cli_grad_accum_is_recorded_and_a_resume_keeps_it_or_refuses_a_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(run, "--steps", "2", "--grad-accum", "2") == 0
    assert json.loads((run / "config.json").read_text())["grad_accum"] == 2
    assert ck.load_checkpoint(run).meta["config"]["grad_accum"] == 2
    # left out on --resume: the run's 2 (the run continues as it was)
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert _cli(tmp_path / "full", "--steps", "4", "--grad-accum", "2") == 0
    assert_bitwise(ck.load_checkpoint(run).model, ck.load_checkpoint(tmp_path / "full").model, "model")
    capsys.readouterr()
    # another N changes the run's objective (its batch, its batch penalty): refused unless overridden
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "6", "--grad-accum", "4"]) == 2
    err = capsys.readouterr().err
    assert "grad_accum: 2 -> 4" in err and "--override grad_accum" in err
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "6", "--grad-accum", "4",
                     "--override", "grad-accum", "--no-progress"]) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["key"], h["old"], h["new"]) for h in history] == [("grad_accum", 2, 4)]

