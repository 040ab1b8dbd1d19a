"""The protocol study (isofast toy2d --protocol): the authors' 2024 model, per-batch timesteps, the
temperature sampler, the paired statistics, the study's files and its bad-input errors."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from isofast.data.order import draw_timesteps, make_noise_generator
from isofast.data.toy2d import make_dataset
from isofast.ensemble import EnsembleRun, ensemble_ddpm_sample
from isofast.ensemble_models import EnsembleAuthorsMLP, EnsembleMLP, stack_members
from isofast.experiments.paired import matched_difference, paired_interval, verdict
from isofast.models.authors_mlp import AuthorsMLP, sinusoidal_encoding
from isofast.models.mlp import TimeMLP
from isofast.models.registry import build_model, model_spec_of
from isofast.noise import NoiseKey
from isofast.reference import ddpm_step
from isofast.schedule import NoiseSchedule
from isofast.train import Trainer
from isofast.train_config import TrainConfig


# ----- the 2024 model ------------------------------------------------------------------------------------
def test_sinusoidal_encoding_is_the_authors_formula():
    s = torch.tensor([1.0, 7.0, 1000.0])
    got = sinusoidal_encoding(s, 50)
    assert got.shape == (3, 50)
    for b, sv in enumerate(s.tolist()):
        for i in range(25):
            w = 1.0 / 10000 ** (2 * i / 50)
            assert got[b, 2 * i].item() == pytest.approx(math.sin(sv * w), abs=1e-7 * (1 + sv))  # float32 angle
            assert got[b, 2 * i + 1].item() == pytest.approx(math.cos(sv * w), abs=1e-7 * (1 + sv))


def test_authors_mlp_shapes_and_time_path():
    model = AuthorsMLP()
    assert [tuple(layer.weight.shape) for layer in model.layers] == [(128, 2), (128, 128), (128, 128), (2, 128)]
    assert [tuple(m.weight.shape) for m in model.time_in] == [(128, 50)] * 3 + [(2, 50)]
    assert [tuple(m.weight.shape) for m in model.time_out] == [(128, 128)] * 3 + [(2, 2)]
    x, t = torch.randn(5, 2), torch.tensor([0, 1, 10, 500, 999])
    # by hand: the time term of layer l is time_out(relu(time_in(enc(t + 1)))); ReLU after all but the last
    e = sinusoidal_encoding(t.float() + 1, 50)
    h = x
    for i, (layer, a, c) in enumerate(zip(model.layers, model.time_in, model.time_out, strict=True)):
        h = layer(h) + c(torch.relu(a(e)))
        h = torch.relu(h) if i < 3 else h
    torch.testing.assert_close(model(x, t), h, rtol=0, atol=0)
    assert model(x, 3).shape == (5, 2)
    assert isinstance(build_model(model_spec_of(model)), AuthorsMLP)
    with pytest.raises(ValueError, match="emb_dim"):
        AuthorsMLP(emb_dim=49)
    with pytest.raises(ValueError, match="x must"):
        model(torch.randn(5, 3), t)


@pytest.mark.parametrize("kind", [TimeMLP, AuthorsMLP])
def test_stacked_members_compute_what_each_member_computes(kind):
    torch.manual_seed(0)
    members = [kind() for _ in range(3)]
    ens = stack_members(members)
    assert isinstance(ens, EnsembleAuthorsMLP if kind is AuthorsMLP else EnsembleMLP)
    x, t = torch.randn(3, 7, 2), torch.randint(0, 1000, (3, 7))
    got = ens(x, t)
    shared = ens.forward_shared_t(x, torch.tensor([4, 90, 999]))
    for m, member in enumerate(members):
        torch.testing.assert_close(got[m], member(x[m], t[m]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared[m], member(x[m], [4, 90, 999][m]), rtol=1e-5, atol=1e-6)
        for a, b in zip(ens.member(m).state_dict().values(), member.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    sub = ens.subset([2, 0])
    assert sub.members == 2
    torch.testing.assert_close(sub(x[[2, 0]], t[[2, 0]]), got[[2, 0]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="members"):
        ens.subset([3])


# ----- per-batch timesteps -------------------------------------------------------------------------------
def test_per_batch_timesteps_share_one_t():
    gen = make_noise_generator(0)
    draws = [draw_timesteps(1000, 64, "per-batch", gen) for _ in range(50)]
    assert all(d.shape == (64,) and (d == d[0]).all() for d in draws)
    assert len({int(d[0]) for d in draws}) > 40  # a fresh t each step
    assert len(set(draw_timesteps(1000, 64, "per-sample", gen).tolist())) > 40
    with pytest.raises(ValueError, match="timesteps"):
        draw_timesteps(1000, 64, "per-step", gen)
    with pytest.raises(ValueError, match="timesteps"):
        TrainConfig(out_dir="x", steps=1, timesteps="batch")


def test_trainer_per_batch_steps_see_one_t(tmp_path):
    seen = []

    class Spy(TimeMLP):
        def forward(self, x, t):
            seen.append(t.clone())
            return super().forward(x, t)

    cfg = TrainConfig(out_dir=str(tmp_path), steps=5, batch_size=16, T=100, timesteps="per-batch", progress=False,
                      tensorboard=False, log_every=5, ckpt_every=5)
    Trainer(Spy(), make_dataset("swiss_roll", 64), cfg).fit()
    assert len(seen) == 5 and all((t == t[0]).all() for t in seen)
    assert len({int(t[0]) for t in seen}) > 1


def test_ensemble_equals_single_runs_per_batch_authors_model(tmp_path):
    """authors2024's settings (AuthorsMLP, per-batch t, no EMA, no clipping): each member is its single run."""
    steps, seeds, lambdas = 60, [0, 1], [0.0, 0.3]
    data = [make_dataset("swiss_roll", 256, seed=s) for s in seeds]
    cfg = dict(steps=steps, batch_size=32, T=100, ema_decay=0.0, grad_clip=None, timesteps="per-batch",
               progress=False, tensorboard=False, log_every=steps, ckpt_every=steps)
    ens = EnsembleRun(data, seeds, lambdas, TrainConfig(out_dir=str(tmp_path / "e"), **cfg), model="authors_mlp")
    ens.fit()
    for m, (seed, lam) in enumerate(zip(seeds, lambdas, strict=True)):
        torch.manual_seed(seed)
        single = Trainer(AuthorsMLP(), data[m], TrainConfig(out_dir=str(tmp_path / f"s{m}"), seed=seed,
                                                            iso_lambda=lam, **cfg))
        single.fit()
        for (key, a), b in zip(ens.model.member(m).state_dict().items(), single.model.state_dict().values(),
                               strict=True):
            rel = float((a - b).norm() / b.norm())
            assert rel <= 1e-5, f"member {m}, {key}: relative difference {rel:.2e}"


def test_ensemble_resume_is_exact(tmp_path):
    data = [make_dataset("moons", 200, seed=s) for s in (0, 1)]
    cfg = TrainConfig(out_dir=str(tmp_path), steps=40, batch_size=16, T=50, progress=False, tensorboard=False,
                      log_every=10)
    whole = EnsembleRun(data, [0, 1], [0.0, 0.2], cfg).fit()
    first = EnsembleRun(data, [0, 1], [0.0, 0.2], cfg).fit(25)
    resumed = EnsembleRun(data, [0, 1], [0.0, 0.2], cfg)
    resumed.load_state_dict(first.state_dict())
    resumed.fit()
    for a, b in zip(whole.ema_model.state_dict().values(), resumed.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert whole.loss_log == resumed.loss_log
    with pytest.raises(ValueError, match="seeds"):
        EnsembleRun(data, [0, 2], [0.0, 0.2], cfg).load_state_dict(first.state_dict())


# ----- temperature -----------------------------------------------------------------------------------------
def test_temperature_one_is_the_plain_sampler_and_tau_scales_every_noise():
    torch.manual_seed(1)
    members = [AuthorsMLP() for _ in range(2)]
    ens, sched, seeds = stack_members(members), NoiseSchedule.linear(T=10), [3, 4]
    plain = ensemble_ddpm_sample(ens, 20, sched, seeds)
    assert torch.equal(ensemble_ddpm_sample(ens, 20, sched, seeds, temperature=1.0), plain)
    tau = 0.8
    got = ensemble_ddpm_sample(ens, 20, sched, seeds, temperature=tau)
    for m, seed in enumerate(seeds):  # by hand: x_T and every step's z scaled by tau, reference steps
        gen = torch.Generator().manual_seed(seed)
        x = tau * NoiseKey.draw((20, 2), torch.float32, "cpu", gen).materialize()
        step_seed = NoiseKey.draw((20, 2), torch.float32, "cpu", gen).seed
        from isofast.sampling import step_key

        for i, t in enumerate(range(9, -1, -1)):
            z = step_key(step_seed, i, (20, 2)).materialize() * tau
            tt = torch.full((20,), t)
            with torch.no_grad():
                x = ddpm_step(x, members[m](x, tt), tt, sched, z)
        torch.testing.assert_close(got[m], x, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            ensemble_ddpm_sample(ens, 4, sched, seeds, temperature=bad)


# ----- statistics ------------------------------------------------------------------------------------------
def test_paired_interval_by_hand():
    iv = paired_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd sqrt(5/3) = 1.2909944, t(0.975, 3) = 3.1824463, half = t * sd / 2 = 2.0542601
    assert iv["mean"] == pytest.approx(2.5)
    assert iv["std"] == pytest.approx(1.2909944, abs=1e-7)
    assert iv["lo"] == pytest.approx(2.5 - 2.0542601, abs=1e-6)
    assert iv["hi"] == pytest.approx(2.5 + 2.0542601, abs=1e-6)
    assert verdict(iv) == "gain"
    assert verdict(paired_interval([-1.0, 1.0, 0.5])) == "n.s."
    assert verdict(paired_interval([-1.0, -1.2, -0.9])) == "loss"
    one = paired_interval([0.3, math.nan])
    assert one["n"] == 1 and math.isnan(one["lo"]) and verdict(one) == "n.s."


def test_matched_difference_interpolates_the_temperature_curve():
    # curve (recall, precision): (0.9, 0.7), (0.8, 0.8), (0.6, 0.9); at recall 0.7 the curve gives 0.85
    assert matched_difference(0.7, 0.9, [0.9, 0.8, 0.6], [0.7, 0.8, 0.9]) == pytest.approx(0.05)
    assert math.isnan(matched_difference(0.95, 0.9, [0.9, 0.8, 0.6], [0.7, 0.8, 0.9]))


# ----- the study, end to end -------------------------------------------------------------------------------
def _toy2d(capsys, *args) -> tuple[int, str]:
    """isofast toy2d ARGS in this process: (exit code, stderr)."""
    from isofast.cli import main

    try:
        code = main(["toy2d", *args, "--no-progress"])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    return code, capsys.readouterr().err


def test_study_writes_prdc_csv_and_paired_summary(tmp_path):
    from isofast.experiments.study import PRDC_COLUMNS, run_study, study_config

    cfg = study_config("authors2024", str(tmp_path / "s"), ["swiss_roll"], lambdas=(0.0, 0.3), seeds=(0, 1, 2),
                       steps=8, n_points=300, n_eval=60, temperatures=(0.8,), eval_at=(0.5,), references=("test",
                                                                                                             "train"))
    run_study(cfg, log=lambda msg: None)
    with open(tmp_path / "s" / "prdc.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == PRDC_COLUMNS
    # 6 members x 2 steps x 2 references at tau 1, plus 3 lambda-0 members x 2 references at tau 0.8
    assert len(rows) == 6 * 2 * 2 + 3 * 2
    assert {r["reference"] for r in rows} == {"test", "train"}
    assert {r["step"] for r in rows} == {"4", "8"}
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "Paired difference to lambda = 0" in summary and "matched recall" in summary
    assert (tmp_path / "s" / "frontier_swiss_roll.png").exists()
    assert "wall time of this invocation" in summary
    # resuming a finished study reads its rows back, trains nothing; its summary keeps the first invocation's time
    first = json.loads((tmp_path / "s" / "study.json").read_text())["invocation_wall_s"]
    again = run_study(cfg, resume=True, log=lambda msg: None)
    assert len(again) == len(rows)
    times = json.loads((tmp_path / "s" / "study.json").read_text())["invocation_wall_s"]
    assert times[:1] == first and len(times) == 2
    assert f"wall time {sum(times) / 60:.1f} min over 2 invocations (this one {times[1] / 60:.1f} min)" in \
        (tmp_path / "s" / "summary.md").read_text()
    # the samples' spread, read back from the study's last save
    from isofast.experiments.study_norms import sample_norms

    norms = sample_norms(tmp_path / "s", n=16)["swiss_roll"]
    assert [(r["lambda"], r["seed"]) for r in norms] == [(lam, s) for s in (0, 1, 2) for lam in (0.0, 0.3)]
    assert all(math.isfinite(r["sample_sq_norm"]) and r["train_sq_norm"] > 0 for r in norms)


@pytest.mark.parametrize("args, message", [
    (["--protocol", "authors2030"], "invalid choice"),
    (["--protocol", "isofast", "--timesteps", "per-step"], "invalid choice"),
    (["--protocol", "isofast", "--model", "resnet"], "invalid choice"),
    (["--protocol", "isofast", "--eval-against", "valid"], "invalid choice"),
    (["--protocol", "isofast", "--temperatures", "1", "0"], "--temperatures"),
    (["--protocol", "isofast", "--eval-against", "test"], "no test split"),
    (["--protocol", "isofast", "--lambdas", "0.1", "0.3"], "must include 0"),
    (["--protocol", "isofast", "--eval-at", "1.5"], "--eval-at"),
    (["--timesteps", "per-batch"], "need --protocol"),
])
def test_study_bad_input_is_refused_clearly(tmp_path, capsys, args, message):
    code, err = _toy2d(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "runs").exists()  # refused before any training


def test_isofast_train_takes_the_protocol_knobs(tmp_path, capsys):
    import json

    from isofast.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "swiss_roll", "--model", "authors_mlp", "--timesteps", "per-batch",
                 "--data-noise", "0.1", "--ema-decay", "0", "--grad-clip", "0", "--n-points", "200", "--steps", "6",
                 "--batch-size", "32", "--out", str(out), "--no-progress", "--no-tensorboard"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["timesteps"] == "per-batch" and config["data"]["noise"] == 0.1 and config["ema_decay"] == 0
    assert main(["sample", str(out), "--num", "8", "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["train", "--data", "central_banana", "--data-noise", "0.1", "--steps", "2", "--out",
                 str(tmp_path / "bad"), "--no-progress"])
    assert code == 2 and "no data-noise parameter" in capsys.readouterr().err


def test_paired_table_pairs_each_seed_with_its_own_baseline(capsys, tmp_path):
    from isofast.experiments.paired import main, paired_table

    rows = [{"dataset": "d", "iso_lambda": lam, "seed": s, "precision": p}
            for lam, s, p in ((0, 0, 0.5), (0.3, 0, 0.6), (0, 1, 0.7), (0.3, 1, 0.9), (0, 2, 0.1), (0.3, 2, 0.2),
                              (0.3, 3, 0.99))]  # seed 3 has no baseline: not paired
    (row,) = paired_table(rows, ("precision",), lambda_key="iso_lambda")
    assert row["seeds"] == [0, 1, 2]
    assert row["precision"]["mean"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    path = tmp_path / "runs.csv"
    path.write_text("dataset,iso_lambda,seed,precision,recall,density,coverage\n"
                    + "".join(f"d,{lam},{s},{p},1,1,1\n" for lam, s, p in ((0, 0, 0.5), (0.3, 0, 0.6), (0, 1, 0.7),
                                                                          (0.3, 1, 0.9))))
    assert main([str(path)]) == 0
    assert "| d | 0.3 | 2 | +0.1500" in capsys.readouterr().out


def test_study_extended_by_resume_equals_the_longer_study(tmp_path):
    """--resume with more --steps trains on from the last save: the same weights and rows as a study run to the
    longer budget at once; earlier evaluations are kept; shortening or another change is refused."""
    from isofast.experiments.study import prepare_study, run_study, study_config

    small = dict(lambdas=(0.0, 0.3), seeds=(0, 1), n_points=200, n_eval=40, temperatures=(0.8,),
                 references=("test",), T=50)
    short = study_config("authors2024", str(tmp_path / "ext"), ["moon_scatter"], steps=6, eval_at=(0.5,), **small)
    run_study(short, log=lambda msg: None)
    longer = study_config("authors2024", str(tmp_path / "ext"), ["moon_scatter"], steps=12, eval_at=(0.25, 0.5),
                          **small)
    logged: list[str] = []
    rows = run_study(longer, resume=True, log=logged.append)
    assert any("extending the study from 6 to 12 steps" in m for m in logged)
    assert not any("lies before" in m for m in logged)  # step 3 was evaluated by the short study
    whole = run_study(study_config("authors2024", str(tmp_path / "whole"), ["moon_scatter"], steps=12,
                                   eval_at=(0.25, 0.5), **small), log=lambda msg: None)
    key = lambda r: (r["step"], r["lambda"], r["temperature"], r["seed"], r["reference"])  # noqa: E731
    ext = {key(r): r for r in rows}
    # the extension's step-12 rows equal the one-go study's; it also keeps the short study's tau rows at step 6
    for r in whole:
        if r["step"] == 12:
            assert ext[key(r)] == r
    assert {r["step"] for r in rows} == {3, 6, 12} and {r["fraction"] for r in rows} == {0.25, 0.5, 1.0}
    assert any(r["step"] == 6 and r["temperature"] == 0.8 for r in rows)
    a = torch.load(tmp_path / "ext" / "runs" / "moon_scatter" / "ensemble.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "whole" / "runs" / "moon_scatter" / "ensemble.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json

    assert json.loads((tmp_path / "ext" / "study.json").read_text())["extended_from_steps"] == [6]
    assert "Training loss: has it flattened?" in (tmp_path / "ext" / "summary.md").read_text()
    with pytest.raises(ValueError, match="cannot shorten"):
        prepare_study(short, resume=True)
    with pytest.raises(ValueError, match="other values of lr"):
        prepare_study(study_config("authors2024", str(tmp_path / "ext"), ["moon_scatter"], steps=12, lr=2e-3,
                                   **small), resume=True)


def test_new_eval_fraction_before_the_save_is_replayed_exactly(tmp_path):
    """--resume with an --eval-at fraction before the last save trains the members again from step 0 to it: its
    rows equal those of a study that evaluated there from the start; a replay that does not retrace the saved
    run (its loss log differs) is refused, and nothing it measured is written."""
    import json

    from isofast.experiments.study import run_study, study_config

    small = dict(lambdas=(0.0, 0.3), seeds=(0, 1), n_points=200, n_eval=40, temperatures=(0.8,),
                 references=("test",), steps=40, T=50)
    first = study_config("authors2024", str(tmp_path / "late"), ["moon_scatter"], eval_at=(0.5,), **small)
    run_study(first, log=lambda msg: None)
    later = study_config("authors2024", str(tmp_path / "late"), ["moon_scatter"], eval_at=(0.25, 0.5), **small)
    logged: list[str] = []
    rows = run_study(later, resume=True, log=logged.append)
    assert any("replaying the members from step 0" in m for m in logged)
    whole = run_study(study_config("authors2024", str(tmp_path / "whole"), ["moon_scatter"], eval_at=(0.25, 0.5),
                                   **small), log=lambda msg: None)
    assert sorted(map(str, rows)) == sorted(map(str, whole))  # the step-10 rows too, bit for bit
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    # a save whose loss log the replay cannot retrace: refused before any row is added
    folder = tmp_path / "late" / "runs" / "moon_scatter"
    state = torch.load(folder / "ensemble.pt", weights_only=False)
    state["loss_log"][0][1][0] += 1e-3
    torch.save(state, folder / "ensemble.pt")
    rows_before = (folder / "rows.json").read_text()
    wider = study_config("authors2024", str(tmp_path / "late"), ["moon_scatter"], eval_at=(0.1, 0.25, 0.5), **small)
    with pytest.raises(ValueError, match="did not retrace the saved run"):
        run_study(wider, resume=True, log=lambda msg: None)
    assert (folder / "rows.json").read_text() == rows_before
    assert {r["step"] for r in json.loads(rows_before)} == {10, 20, 40}
