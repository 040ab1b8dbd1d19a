"""The digits study (`python -m isofast.experiments.digits_study`): end to end on tiny settings, resume,
bad input, the tempered sampler and the split."""
import csv
import json
import math

import pytest
import torch
from trainer_helpers import one_thread  # noqa: F401  (autouse: one torch thread)

from isofast.experiments import digits_study
from isofast.experiments.digits_arm import digits_unet, split_digits, tempered_ddpm_sample
from isofast.experiments.digits_report import matching_tau
from isofast.experiments.digits_study import CSV_COLUMNS, DigitsConfig, main, run_study
from isofast.sampling import ddpm_sample
from isofast.schedule import NoiseSchedule

TINY = dict(lambdas=(0.0, 0.3), seeds=(0, 1), temperatures=(1.0, 0.8), steps=2, batch_size=16, T=5,
            base_channels=8, channel_mult=(1,), n_samples=8)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    cfg = DigitsConfig(out=str(out), **TINY)
    rows = run_study(cfg, log=lambda msg: None)
    return cfg, out, rows


def test_it_runs_end_to_end_and_writes_the_columns(finished):
    cfg, out, rows = finished
    table = read_csv(out / "prdc.csv")
    assert tuple(table[0]) == CSV_COLUMNS
    # per seed: lambda 0 at taus 1 and 0.8, lambda 0.3 at tau 1; each against test and train
    assert len(table) == 2 * (2 + 1) * 2
    assert {(r["lambda"], r["temperature"]) for r in table} == {("0.0", "1.0"), ("0.0", "0.8"), ("0.3", "1.0")}
    assert {r["reference"] for r in table} == {"test", "train"}
    for r in table:
        for m in ("precision", "recall", "density", "coverage"):
            assert 0 <= float(r[m]) < math.inf
        assert float(r["sample_sq_norm"]) > 0
    summary = (out / "summary.md").read_text()
    for heading in ("Paired difference to lambda = 0", "Temperature baseline", "matched recall",
                    "What the numbers show", "Reference `test`", "Reference `train`"):
        assert heading in summary
    for name in ("frontier_test.png", "frontier_train.png", "grids/lambda_0.3_seed_1.png",
                 "grids/lambda_0_seed_0_tau_0.8.png"):
        assert (out / name).stat().st_size > 0, name
    timing = json.loads((out / "timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["cpu_s"] > 0 and len(timing["loadavg_start"]) == 3


def test_report_only_rewrites_the_summary_from_the_arms_results(finished):
    cfg, out, _ = finished
    before = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    assert main(["--out", str(out), "--report-only"]) == 0
    assert (out / "summary.md").read_text() == before
    for key in ("precision at matched recall", "density at matched recall", "density at matched coverage"):
        assert key in before


def test_report_only_needs_a_finished_study(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--report-only"])
    assert "holds no finished digits study" in capsys.readouterr().err


def test_the_same_seed_shares_initial_weights_and_lambda_changes_training(finished):
    cfg, out, _ = finished
    from safetensors.torch import load_file

    def weights(lam, seed):
        ck = sorted((out / "runs" / f"lambda_{lam:g}_seed_{seed}" / "train" / "checkpoints").glob("step_*"))[-1]
        return load_file(ck / "model.safetensors")

    a, b = weights(0.0, 0), weights(0.3, 0)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the penalty changed the gradients
    start = [digits_unet(0, base_channels=8, channel_mult=(1,)).state_dict() for _ in range(2)]
    assert all(torch.equal(start[0][k], start[1][k]) for k in start[0])


def test_resume_skips_finished_arms(tmp_path, monkeypatch):
    cfg = DigitsConfig(out=str(tmp_path), **TINY)
    run_study(cfg, log=lambda msg: None)
    redo = tmp_path / "runs" / "lambda_0.3_seed_1" / "result.json"
    kept = tmp_path / "runs" / "lambda_0_seed_0" / "result.json"
    before = kept.read_text()
    redo.unlink()
    ran = []
    real = digits_study.run_arm
    monkeypatch.setattr(digits_study, "run_arm", lambda cfg, lam, seed, *a: ran.append((lam, seed)) or real(
        cfg, lam, seed, *a))
    rows = run_study(cfg, resume=True, log=lambda msg: None)
    assert ran == [(0.3, 1)]
    assert kept.read_text() == before and redo.exists()
    assert len(rows) == 12 and len(read_csv(tmp_path / "prdc.csv")) == 12
    # an added seed runs only its own arms
    ran.clear()
    run_study(DigitsConfig(out=str(tmp_path), **{**TINY, "seeds": (0, 1, 2)}), resume=True, log=lambda msg: None)
    assert ran == [(0.0, 2), (0.3, 2)]


def test_a_finished_study_is_not_overwritten_or_resumed_with_other_settings(finished):
    cfg, out, _ = finished
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(cfg)
    with pytest.raises(ValueError, match="steps"):
        run_study(DigitsConfig(out=str(out), **{**TINY, "steps": 3}), resume=True)


@pytest.mark.parametrize("change, message", [
    ({"temperatures": (1.0, 0.0)}, "--temperatures must be finite floats > 0"),
    ({"temperatures": (-0.5,)}, "--temperatures must be finite floats > 0"),
    ({"references": ("test", "fresh")}, "--references must name distinct reference sets of test, train"),
    ({"lambdas": (0.3,)}, "--lambdas must include 0"),
    ({"seeds": (0, 0)}, "--seeds must be distinct"),
    ({"n_samples": 5}, "--n-samples must be an int >= k \\+ 1"),
    ({"schedule": "square"}, "--schedule must be one of"),
])
def test_bad_input_is_refused_before_training(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        run_study(DigitsConfig(out=str(tmp_path), **{**TINY, **change}))
    assert not (tmp_path / "study.json").exists()


def test_the_command_line_names_the_bad_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--temperatures", "1", "0"])
    assert exc.value.code == 2
    assert "--temperatures must be finite floats > 0, got [1.0, 0.0]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--references", "fresh"])
    assert "--references must name distinct reference sets of test, train, got ['fresh']" in capsys.readouterr().err


def test_temperature_one_is_the_plain_sampler_bit_for_bit_and_tau_scales_a_linear_chain():
    model = digits_unet(0, base_channels=8, channel_mult=(1,)).eval()  # untrained: eps_pred = 0 exactly
    sched = NoiseSchedule.cosine(20)
    for clip in (True, False):
        plain = ddpm_sample(model, (6, 1, 8, 8), sched, clip_x0=clip, generator=torch.Generator().manual_seed(3),
                            progress=False)
        assert torch.equal(tempered_ddpm_sample(model, (6, 1, 8, 8), sched, 3, 1.0, clip_x0=clip), plain)
    # unclamped, with eps_pred = 0 every step is linear in x_T and the noise: tau scales the whole chain
    torch.testing.assert_close(tempered_ddpm_sample(model, (6, 1, 8, 8), sched, 3, 0.8, clip_x0=False), 0.8 * plain,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        tempered_ddpm_sample(model, (6, 1, 8, 8), sched, 3, 0.0)


def test_the_split_holds_out_digits_and_the_references_have_one_size():
    data = split_digits(0.2, 0)
    assert data["test"].shape == data["train_ref"].shape == (359, 1, 8, 8)
    assert data["train"].shape[0] + data["test"].shape[0] == 1797
    flat = {tuple(x.flatten().tolist()) for x in data["train"]}
    assert all(tuple(x.flatten().tolist()) in flat for x in data["train_ref"])
    assert data["train"].min() >= -1 and data["train"].max() <= 1
    assert torch.equal(split_digits(0.2, 0)["test"], data["test"])


def test_matching_tau_interpolates_along_the_temperature_curve():
    taus, recall = [1.0, 0.9, 0.8], [0.6, 0.5, 0.3]
    assert matching_tau(0.55, taus, recall) == pytest.approx(0.95)
    assert matching_tau(0.4, taus, recall) == pytest.approx(0.85)
    assert math.isnan(matching_tau(0.7, taus, recall))
