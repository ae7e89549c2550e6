"""The clients' learning-rate schedule: its values, its checks, and that the optimizer follows it."""
import jax.numpy as jnp
import numpy as np
import pytest

from fedfms_jax import run_config, run_state
from fedfms_jax.cli_errors import UsageError


def _cfg(**kw):
    c = run_config.base_config()
    c.lr, c.rounds, c.local_steps = 1e-3, 4, 5
    c.lr_schedule, c.lr_warmup_rounds = "warmup_cosine", 1
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_constant_is_the_default_and_a_plain_number():
    c = run_config.base_config()
    assert c.lr_schedule == "constant" and c.lr_warmup_rounds == 0
    assert run_state.client_lr(c) == c.lr


def test_warmup_cosine_values():
    lr = run_state.client_lr(_cfg())  # warm-up 5 steps, 20 steps in all
    at = lambda t: float(lr(jnp.asarray(t, jnp.int32)))  # noqa: E731
    np.testing.assert_allclose([at(t) for t in range(5)], [2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6)
    assert at(5) == pytest.approx(1e-3)                    # the cosine starts at the peak
    assert at(12) > 5e-4 > at(13)                          # half-way (step 12.5): half the peak
    decay = [at(t) for t in range(5, 20)]
    assert all(a > b for a, b in zip(decay, decay[1:]))    # strictly decreasing after the warm-up
    assert 0 < at(19) < 2e-5 and at(20) == pytest.approx(0.0, abs=1e-12) and at(40) == pytest.approx(0.0, abs=1e-12)
    # a round is local_steps x local_epochs steps: the schedule stretches with it
    doubled = run_state.client_lr(_cfg(local_epochs=2))
    assert float(doubled(jnp.asarray(9))) == pytest.approx(1e-3) and float(doubled(jnp.asarray(39))) > 0
    assert float(doubled(jnp.asarray(40))) == pytest.approx(0.0, abs=1e-12)
    # no warm-up: the first step already takes the peak
    no_warmup = run_state.client_lr(_cfg(lr_warmup_rounds=0))
    assert float(no_warmup(jnp.asarray(0))) == pytest.approx(1e-3)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_client_optimizer_follows_the_schedule_step_by_step(weight_decay):
    """Adam's first steps move a parameter by about the learning rate of that step; the
    count lives in the optimizer state, which the engine carries from round to round."""
    cfg = _cfg(weight_decay=weight_decay)
    tx, lr = run_state.client_optimizer(cfg), run_state.client_lr(cfg)
    params, grads = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    state = tx.init(params)
    for t in range(cfg.rounds * cfg.local_steps):
        # zero weights: decoupled decay adds nothing; a constant gradient: Adam's step is ~ -lr
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(updates["w"], -float(lr(jnp.asarray(t))), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("fields,message", [
    (dict(lr_schedule="cosine"), "lr_schedule must be one of"),
    (dict(local_steps=0), "needs local_steps >= 1"),
    (dict(lr_warmup_rounds=4), "lr_warmup_rounds must be in 0..rounds-1"),
    (dict(lr_warmup_rounds=-1), "lr_warmup_rounds must be in 0..rounds-1"),
    (dict(lr_schedule="constant", lr_warmup_rounds=1), "lr_warmup_rounds needs lr_schedule=warmup_cosine"),
])
def test_schedule_checks(fields, message):
    run_config.validate(_cfg())
    with pytest.raises(UsageError, match=message):
        run_config.validate(_cfg(**fields))
