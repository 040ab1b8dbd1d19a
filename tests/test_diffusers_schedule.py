"""NoiseSchedule.from_diffusers / to_diffusers: diffusers' DDPMScheduler and DDIMScheduler as the oracle.

diffusers holds its tables in float32, isofast computes in float64 and rounds once: against diffusers the
tables agree to float32 rounding; converting isofast -> diffusers config -> isofast is exact in float64.
"""
import pytest
import torch

from isofast import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

# (config fields, the isofast schedule they name), for every beta_schedule both share
SHARED = [
    ({"beta_schedule": "linear"}, lambda T: NoiseSchedule.linear(T, dtype=torch.float64)),
    ({"beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.05},
     lambda T: NoiseSchedule.linear(T, 0.0002, 0.05, dtype=torch.float64)),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
     lambda T: NoiseSchedule.scaled_linear(T, 0.00085, 0.012, dtype=torch.float64)),
    ({"beta_schedule": "squaredcos_cap_v2"}, lambda T: NoiseSchedule.cosine(T, dtype=torch.float64)),
]
F32_ULP = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("scheduler_cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("fields,expected", SHARED, ids=lambda v: str(v.get("beta_schedule")) if isinstance(v, dict) else "")
def test_from_diffusers_matches_diffusers_tables(fields, expected, scheduler_cls, T):
    scheduler = getattr(diffusers, scheduler_cls)(num_train_timesteps=T, **fields)
    for source in (scheduler, scheduler.config, dict(scheduler.config)):  # a scheduler or its config
        sched = NoiseSchedule.from_diffusers(source, dtype=torch.float64)
        assert sched.T == T
        # float64: exactly the schedule the config names, computed as isofast computes every schedule
        torch.testing.assert_close(sched.betas, expected(T).betas, rtol=0, atol=0)
        torch.testing.assert_close(sched.alphas_cumprod, expected(T).alphas_cumprod, rtol=0, atol=0)
    # diffusers' float32 tables: the same values rounded (betas within 2 float32 ulps, the products
    # within float32 accumulation)
    ulps = (sched.betas - scheduler.betas.double()).abs() / (F32_ULP * scheduler.betas.double())
    assert ulps.max() <= 2.0
    torch.testing.assert_close(sched.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("make", [lambda T: NoiseSchedule.linear(T), lambda T: NoiseSchedule.scaled_linear(T),
                                  lambda T: NoiseSchedule.cosine(T),
                                  lambda T: NoiseSchedule.from_betas(torch.linspace(1e-3, 0.3, T) ** 1.5)],
                         ids=["linear", "scaled_linear", "cosine", "custom"])
def test_to_diffusers_round_trip_is_exact_in_float64(make, kind, T):
    sched = make(T)
    scheduler = sched.to_diffusers(kind)
    assert type(scheduler).__name__ == {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}[kind]
    assert scheduler.config.num_train_timesteps == T and scheduler.config.clip_sample is False
    assert scheduler.config.prediction_type == "epsilon"
    expected_name = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    if sched.name in expected_name:  # a named schedule is written by name, anything else as trained_betas
        assert scheduler.config.beta_schedule == expected_name[sched.name] and scheduler.config.trained_betas is None
    else:
        assert scheduler.config.trained_betas is not None
    back = NoiseSchedule.from_diffusers(scheduler, dtype=torch.float64)
    torch.testing.assert_close(back.betas, sched.masters["betas"], rtol=1e-15, atol=0)
    torch.testing.assert_close(back.alphas_cumprod, sched.masters["alphas_cumprod"], rtol=1e-14, atol=0)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), sched.masters["alphas_cumprod"], rtol=0, atol=2e-6)


def test_to_diffusers_overrides_and_bad_kind():
    scheduler = NoiseSchedule.linear(10).to_diffusers("ddim", clip_sample=True, set_alpha_to_one=False)
    assert scheduler.config.clip_sample is True and scheduler.config.set_alpha_to_one is False
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseSchedule.linear(10).to_diffusers("euler")


@pytest.mark.parametrize("override,match", [
    ({"num_train_timesteps": 20}, "overrides num_train_timesteps=20 differs from the schedule's T = 10"),
    ({"beta_end": 0.05}, "overrides beta_end=0.05 differs from the schedule's 0.02"),
    ({"beta_schedule": "scaled_linear"}, "overrides beta_schedule='scaled_linear' differs"),
    ({"trained_betas": [0.1] * 10}, "overrides trained_betas="),
])
def test_to_diffusers_refuses_overrides_that_change_the_betas_or_T(override, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.linear(10).to_diffusers("ddpm", **override)
    # the schedule's own values are no change
    same = NoiseSchedule.linear(10).to_diffusers("ddim", num_train_timesteps=10, beta_start=1e-4, beta_end=0.02)
    assert same.config.num_train_timesteps == 10


def test_from_diffusers_trained_betas_float64():
    betas = torch.linspace(1e-4, 0.02, 20, dtype=torch.float64)
    sched = NoiseSchedule.from_diffusers({"num_train_timesteps": 20, "trained_betas": betas.tolist()},
                                         dtype=torch.float64)
    assert torch.equal(sched.betas, betas)  # the listed values, not diffusers' float32 copy of them


@pytest.mark.parametrize("config,match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' has no isofast equivalent"),
    ({"beta_schedule": "laplace"}, "beta_schedule 'laplace'"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"num_train_timesteps": 10, "trained_betas": [0.1] * 9}, "trained_betas must hold num_train_timesteps = 10"),
    ({"num_train_timesteps": 0}, "num_train_timesteps must be a positive int"),
])
def test_from_diffusers_refuses_what_isofast_cannot_represent(config, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_diffusers(config)


def test_from_diffusers_refuses_non_scheduler():
    with pytest.raises(TypeError, match="diffusers scheduler"):
        NoiseSchedule.from_diffusers(42)
