"""The ensemble engine: M members trained and sampled at once equal M single runs."""
from __future__ import annotations

import copy

import pytest
import torch

from isofast.data.toy2d import make_dataset
from isofast.ensemble import EnsembleMLP, EnsembleRun, ensemble_ddpm_sample, kernel_draw, kernel_draws
from isofast.models.mlp import TimeMLP
from isofast.noise import NoiseKey
from isofast.ops import extension
from isofast.sampling import ddpm_sample
from isofast.schedule import NoiseSchedule
from isofast.train import Trainer
from isofast.train_config import TrainConfig


def test_stacked_forward_equals_each_member():
    torch.manual_seed(0)
    members = [TimeMLP() for _ in range(3)]
    ens = EnsembleMLP(members)
    x, t = torch.randn(3, 7, 2), torch.randint(0, 1000, (3, 7))
    got = ens(x, t)
    for m, member in enumerate(members):
        torch.testing.assert_close(got[m], member(x[m], t[m]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ens.forward_shared_t(x, 17)[m], member(x[m], torch.full((7,), 17)),
                                   rtol=1e-5, atol=1e-6)
        for a, b in zip(ens.member(m).state_dict().values(), member.state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("members,fused", [(3, True), (1, True), (3, False)], ids=["three", "one", "three-ops"])
def test_ensemble_equals_single_runs(tmp_path, members, fused):
    """Weights and EMA after 200 steps equal the single runs', each member with its own seed, lambda and data;
    one member is the ordinary single run (it used to crash: a lambda tensor with groups = 1). Where the fused
    CPU kernels run (isofast._C built), bit for bit: every sum of a member (its layers, loss, clipping norm,
    Adam) is in its single run's order. Adam amplifies a last-bit difference chaotically (a clipping norm
    summed in another order reached 4e-3 relative at step 200 on one of these trajectories), so anything
    short of bit for bit is a matter of luck here. Elsewhere (the batched matmuls round differently): within
    1e-5 relative per tensor. "three-ops": the separate ops (q_sample, the model's autograd function, the loss) in
    place of the one-call training step."""
    steps = 200
    seeds, lambdas = [0, 1, 2][:members], ([0.0, 0.3, 0.1] if members == 3 else [0.3])
    names = ["swiss_roll", "moon_scatter", "swiss_roll"][:members]
    data = [make_dataset(name, 1000, seed=s) for name, s in zip(names, seeds, strict=True)]
    cfg = TrainConfig(out_dir=str(tmp_path / "ensemble"), steps=steps, batch_size=64, T=100)
    ens = EnsembleRun(data, seeds, lambdas, cfg)
    assert ens._fused_step == extension.available("cpu")[0]
    ens._fused_step = ens._fused_step and fused
    ens.fit()
    for m, (seed, lam) in enumerate(zip(seeds, lambdas, strict=True)):
        torch.manual_seed(seed)
        single = Trainer(TimeMLP(), data[m], TrainConfig(
            out_dir=str(tmp_path / f"run{m}"), steps=steps, batch_size=64, iso_lambda=lam, seed=seed, T=100,
            progress=False, tensorboard=False, log_every=steps, ckpt_every=steps))
        single.fit()
        for name, want in (("model", single.model), ("ema", single.ema_model)):
            got = (ens.model if name == "model" else ens.ema_model).member(m)
            for (key, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
                rel = float((a - b).norm() / b.norm())
                if extension.available("cpu")[0]:
                    assert torch.equal(a, b), f"{name} of member {m}, {key}: relative difference {rel:.2e}"
                assert rel <= 1e-5, f"{name} of member {m}, {key}: relative difference {rel:.2e}"


def test_clip_coefficients_are_clip_grad_norms_bit_for_bit():
    """Each member's clipping coefficient is the one clip_grad_norm_ computes on its own model's gradients, bit
    for bit, over gradients of very different sizes (a norm summed in another order differs in its last bits)."""
    from isofast.ensemble import _clip_coefficients

    torch.manual_seed(0)
    members = [TimeMLP(hidden=48, n_layers=2, emb_dim=32) for _ in range(4)]
    ens = EnsembleMLP(members)
    for trial in range(5):
        for p in ens.parameters():
            p.grad = torch.randn(p.shape) * 10.0 ** float(torch.randint(-3, 3, ()))
        got = _clip_coefficients(ens.member_parameters(), 1.0)
        for m in range(4):
            model = ens.member(m)
            with torch.no_grad():
                for (_, p), (_, q) in zip(model.named_parameters(), _member_grads(ens, m), strict=True):
                    p.grad = q.clone()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            assert torch.equal(got[m], (1.0 / (norm + 1e-6)).clamp(max=1.0)), (trial, m)


def _member_grads(ens, m):
    """Member m's gradients in its model's parameter order, shaped as its model's."""
    model = ens.member(m)
    return [(name, p.grad[m].reshape(q.shape)) for (name, q), p in
            zip(model.named_parameters(), ens.member_parameters(), strict=True)]


def test_state_saved_before_the_member_layout_loads(tmp_path):
    """A save of isofast before the member layout (weights stacked as (M, in, out), no "layout" key) resumes the
    same run: its weights, EMA and Adam moments are transposed on load, and training goes on bit for bit."""
    data = [make_dataset("swiss_roll", 300, seed=s) for s in (0, 1)]
    cfg = TrainConfig(out_dir=str(tmp_path), steps=10, batch_size=16, T=50)
    whole = EnsembleRun(data, [0, 1], [0.0, 0.2], cfg).fit(5)
    state = copy.deepcopy(whole.state_dict())  # its tensors are the live ones
    whole.fit(10)
    names = set(whole.model.linear_weight_names())
    assert names == {"weight.0", "weight.1", "weight.2", "proj.0", "proj.1", "proj.2", "out_weight"}
    index = {i for i, (name, _) in enumerate(whole.model.named_parameters()) if name in names}
    old = {k: v for k, v in state.items() if k != "layout"}  # as the earlier isofast wrote it
    old["model"] = {k: v.transpose(1, 2).contiguous() if k in names else v for k, v in state["model"].items()}
    old["ema"] = {k: v.transpose(1, 2).contiguous() if k in names else v for k, v in state["ema"].items()}
    old["optimizer"] = {**state["optimizer"], "state": {
        i: {k: v.transpose(1, 2).contiguous() if i in index and k.startswith("exp_avg") else v for k, v in e.items()}
        for i, e in state["optimizer"]["state"].items()}}
    resumed = EnsembleRun(data, [0, 1], [0.0, 0.2], cfg)
    resumed.load_state_dict(old)
    resumed.fit(10)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="weight layout 'columns'"):
        resumed.load_state_dict({**state, "layout": "columns"})


def test_ensemble_sampling_equals_single_sampling():
    torch.manual_seed(3)
    members = [TimeMLP() for _ in range(2)]
    sched = NoiseSchedule.linear(T=20)
    got = ensemble_ddpm_sample(EnsembleMLP(members), 50, sched, seeds=[5, 6])
    for m, seed in enumerate((5, 6)):
        want = ddpm_sample(members[m], (50, 2), sched, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not extension.available("cpu")[0], reason="isofast._C (CPU kernels) not built")
def test_members_draws_in_one_call_equal_each_members_draw():
    # large unsigned seeds and offsets (their int64 bit patterns are negative), and a draw of several
    # parallel chunks (4096 Philox calls each) whose length is not a multiple of 4
    seeds, offset, shape = [3, 2**63 + 11, 2**64 - 1], 2**40 + 7, (9001, 3)
    got = kernel_draws(seeds, offset, shape, torch.device("cpu"))
    want = torch.stack([kernel_draw(NoiseKey(s, offset, shape)) for s in seeds])
    assert got.shape == (3, *shape) and torch.equal(got, want)
    assert torch.equal(kernel_draws(seeds, offset, shape, torch.device("cpu")), got)  # repeatable
    rows = torch.ops.isofast_C.philox_randn_rows
    with pytest.raises(RuntimeError, match="offsets must be an int64 CPU vector of the seeds' length"):
        rows(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 10)
    with pytest.raises(RuntimeError, match="seeds must be an int64 CPU vector"):
        rows(torch.zeros(3), torch.zeros(3, dtype=torch.int64), 10)
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        rows(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), -1)


def test_bad_members_are_refused(tmp_path):
    data = torch.randn(2, 100, 2)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=1)
    with pytest.raises(ValueError, match="lambdas"):
        EnsembleRun(data, [0, 1], [0.1], cfg)
    with pytest.raises(ValueError, match="data"):
        EnsembleRun(data, [0, 1, 2], [0.1, 0.2, 0.3], cfg)
    with pytest.raises(ValueError, match="one shape"):
        EnsembleRun([torch.randn(100, 2), torch.randn(90, 2)], [0, 1], [0.1, 0.2], cfg)
    with pytest.raises(ValueError, match="warmup_steps"):
        EnsembleRun(data, [0, 1], [0.1, 0.2], TrainConfig(out_dir=str(tmp_path), steps=1, warmup_steps=10))
    with pytest.raises(ValueError, match="seeds"):
        ensemble_ddpm_sample(EnsembleMLP([TimeMLP()]), 4, NoiseSchedule.linear(T=5), seeds=[1, 2])


def test_toy2d_sweep_ensemble_engine_equals_single_engine(tmp_path):
    """`isofast toy2d --engine ensemble`: the same runs, samples and PRDC as the single engine."""
    from isofast.experiments.toy2d import _load_run, config_from_preset, run_dir, run_sweep

    results = {}
    for engine in ("single", "ensemble"):
        cfg = config_from_preset("default", quick=True, out=str(tmp_path / engine))
        run_sweep(cfg, log=lambda msg: None, engine=engine)
        results[engine] = {key: _load_run(run_dir(cfg, *key)) for key in
                           [(d, lam, s) for d in cfg.datasets for lam in cfg.lambdas for s in cfg.seeds]}
    assert results["single"].keys() == results["ensemble"].keys()
    for key, single in results["single"].items():
        ensemble = results["ensemble"][key]
        torch.testing.assert_close(torch.from_numpy(ensemble.samples), torch.from_numpy(single.samples),
                                   rtol=1e-4, atol=1e-4)
        for metric in ("precision", "recall", "density", "coverage"):
            assert abs(getattr(ensemble, metric) - getattr(single, metric)) <= 1e-3, (key, metric)


def test_toy2d_sweep_refuses_unknown_engine(tmp_path):
    from isofast.experiments.toy2d import config_from_preset, run_sweep

    with pytest.raises(ValueError, match="engine"):
        run_sweep(config_from_preset("default", quick=True, out=str(tmp_path)), engine="parallel")


def test_ensemble_sweep_resumes_mid_training_bit_for_bit(tmp_path, monkeypatch):
    """A sweep stopped mid-training continues from the ensemble's last save; samples equal an unbroken sweep's."""
    import numpy as np

    from isofast.ensemble import EnsembleRun as Run
    from isofast.experiments import toy2d_ensemble
    from isofast.experiments.toy2d import _load_run, config_from_preset, run_dir, run_sweep

    monkeypatch.setattr(toy2d_ensemble, "CKPT_EVERY", 6)
    whole = config_from_preset("default", quick=True, out=str(tmp_path / "whole"))
    run_sweep(whole, engine="ensemble", log=lambda msg: None)

    broken = config_from_preset("default", quick=True, out=str(tmp_path / "broken"))
    step = Run.train_step

    def stop_at_15(self):
        if self.step == 15:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Run, "train_step", stop_at_15)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(broken, engine="ensemble", log=lambda msg: None)
    monkeypatch.setattr(Run, "train_step", step)
    resumed_at = []
    load = Run.load_state_dict
    monkeypatch.setattr(Run, "load_state_dict", lambda self, s: (resumed_at.append(s["step"]), load(self, s)))
    run_sweep(broken, resume=True, engine="ensemble", log=lambda msg: None)
    assert resumed_at == [12]  # the last save before the stop, not step 0
    # the invocation's time leaves out the first 12 steps, and says so
    import json
    from pathlib import Path

    timing = json.loads((Path(broken.out) / "timing.json").read_text())
    assert timing["ensemble_resumed_at_step"] == 12 and timing["ensemble_steps"] == broken.steps
    assert f"the ensemble resumed at step 12 of {broken.steps}" in (Path(broken.out) / "results.md").read_text()
    assert json.loads((Path(whole.out) / "timing.json").read_text())["ensemble_resumed_at_step"] == 0
    for key in [(d, lam, s) for d in whole.datasets for lam in whole.lambdas for s in whole.seeds]:
        a, b = _load_run(run_dir(whole, *key)), _load_run(run_dir(broken, *key))
        assert np.array_equal(a.samples, b.samples), key


@pytest.mark.parametrize("setting", [{"grad_accum": 2}, {"precision": "fp16"}])
def test_the_ensemble_refuses_trainer_settings_it_does_not_implement(tmp_path, setting):
    data = [make_dataset("swiss_roll", 200, seed=s) for s in (0, 1)]
    cfg = TrainConfig(out_dir=str(tmp_path), steps=2, batch_size=8, T=20, **setting)
    with pytest.raises(ValueError, match=f"config has {next(iter(setting))}="):
        EnsembleRun(data, [0, 1], [0.0, 0.3], cfg)


def test_training_steps_clipping_norms_equal_torchs(tmp_path, monkeypatch):
    """The clipping norms the one-call training step takes while the gradients are in cache (with the lane count
    checked against torch's at first use) give the same training, bit for bit, as torch's norms."""
    import isofast.ensemble as ensemble_module

    data = [make_dataset("moons", 300, seed=s) for s in (0, 1, 2)]
    cfg = TrainConfig(out_dir=str(tmp_path), steps=30, batch_size=32, T=50)
    fused = EnsembleRun(data, [0, 1, 2], [0.0, 0.1, 0.3], cfg).fit()
    monkeypatch.setattr(ensemble_module, "_verified_norm_lanes", lambda: None)
    plain = EnsembleRun(data, [0, 1, 2], [0.0, 0.1, 0.3], cfg).fit()
    for a, b in zip(fused.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)
