"""The loss functions as pure functions: closed forms from the papers, fixed points, and gradients.
(Every TRL loss is also compared with TRL's DPOTrainer itself in test_trl_parity.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxdpo.dpo.losses import LOSS_NAMES, LOSSES, LossHyper, PairLogps, preference_loss

RNG = np.random.default_rng(0)


def _logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens=None, rejected_tokens=None,
           sft_scale=1.0):
    size = len(policy_chosen)
    return PairLogps(*(np.asarray(v, np.float32) for v in (
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        np.full(size, 4.0) if chosen_tokens is None else chosen_tokens,
        np.full(size, 4.0) if rejected_tokens is None else rejected_tokens, sft_scale)))


def _random_logps(size=64):
    return _logps(*(-RNG.uniform(1, 30, size) for _ in range(4)), RNG.integers(1, 20, size).astype(np.float32),
                  RNG.integers(1, 20, size).astype(np.float32), 0.25)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_dpop_is_the_paper_formula():
    """Pal et al. 2024, eq. 3: −log σ(β·(c − r − λ·max(0, log π_ref(y_w) − log πθ(y_w))))."""
    x = _random_logps()
    beta, lam = 0.3, 50.0
    c = x.policy_chosen - x.ref_chosen
    r = x.policy_rejected - x.ref_rejected
    z = beta * (c - r - lam * np.maximum(0.0, x.ref_chosen - x.policy_chosen))
    expected = np.logaddexp(0.0, -z.astype(np.float64))  # −log σ(z)
    got = preference_loss("dpop", x, LossHyper(beta, dpop_lambda=lam))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_simpo_is_the_paper_formula_and_ignores_the_reference():
    """Meng et al. 2024, eq. 6: −log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ); CPO (Xu et al. 2024,
    eq. 3, without its NLL term): −log σ(β·(log πθ(y_w|x) − log πθ(y_l|x)))."""
    x = _random_logps()
    beta, gamma = 2.5, 1.4
    z = beta * x.policy_chosen / x.chosen_tokens - beta * x.policy_rejected / x.rejected_tokens - gamma
    got = preference_loss("simpo", x, LossHyper(beta, simpo_gamma=gamma))
    np.testing.assert_allclose(got, np.logaddexp(0.0, -z.astype(np.float64)), rtol=1e-5, atol=1e-6)
    z = 0.3 * (x.policy_chosen - x.policy_rejected)
    np.testing.assert_allclose(preference_loss("cpo", x, LossHyper(0.3)), np.logaddexp(0.0, -z.astype(np.float64)),
                               rtol=1e-5, atol=1e-6)
    moved = x._replace(ref_chosen=x.ref_chosen - 3.0, ref_rejected=x.ref_rejected + 7.0)
    for name in ("simpo", "cpo"):
        np.testing.assert_array_equal(preference_loss(name, moved, LossHyper(0.3)),
                                      preference_loss(name, x, LossHyper(0.3)))


def test_orpo_is_the_paper_formula_and_finite_on_empty_slots():
    """Hong et al. 2024, eq. 4-7: NLL − λ·log σ(log(odds(y_w) / odds(y_l))), odds(y) = P / (1 − P), P the mean
    probability per token; an empty (padding) pair slot gives finite values and gradients."""
    x = _random_logps()._replace(chosen_sequence_nll=np.float32(0.7))
    lam = 0.25
    p_w = np.exp(x.policy_chosen.astype(np.float64) / x.chosen_tokens)
    p_l = np.exp(x.policy_rejected.astype(np.float64) / x.rejected_tokens)
    log_odds_ratio = np.log(p_w / (1 - p_w)) - np.log(p_l / (1 - p_l))
    expected = 0.7 + lam * np.logaddexp(0.0, -log_odds_ratio)
    np.testing.assert_allclose(preference_loss("orpo", x, LossHyper(lam)), expected, rtol=1e-5, atol=1e-6)
    empty = _logps([0.0], [0.0], [0.0], [0.0], [0.0], [0.0])
    value, grad = jax.value_and_grad(lambda c: preference_loss("orpo", empty._replace(policy_chosen=c),
                                                               LossHyper(lam)).sum())(jnp.zeros(1))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_dpop_equals_dpo_while_the_chosen_likelihood_does_not_fall():
    x = _random_logps()
    x = x._replace(policy_chosen=np.maximum(x.policy_chosen, x.ref_chosen))  # c >= 0 everywhere
    np.testing.assert_allclose(preference_loss("dpop", x, LossHyper(0.2)), preference_loss("sigmoid", x, LossHyper(0.2)),
                               rtol=1e-6)
    y = _random_logps()
    np.testing.assert_allclose(preference_loss("dpop", y, LossHyper(0.2, dpop_lambda=0.0)),
                               preference_loss("sigmoid", y, LossHyper(0.2)), rtol=1e-6)


def test_dpop_pushes_a_fallen_chosen_likelihood_up_harder_than_dpo():
    """The failure mode DPOP fixes: both likelihoods fall, the margin grows. DPO's gradient on log πθ(y_w)
    vanishes as the margin grows; DPOP's stays large while log πθ(y_w) < log π_ref(y_w)."""
    x = _logps([-12.0], [-30.0], [-10.0], [-11.0])  # chosen fell by 2, margin 17
    def grad(name):
        return jax.grad(lambda pc: preference_loss(name, x._replace(policy_chosen=pc), LossHyper(0.1))[0])(
            jnp.asarray(x.policy_chosen))[0]
    assert abs(float(grad("sigmoid"))) < 0.02
    assert float(grad("dpop")) < -1.0  # descent raises log πθ(y_w)


def test_cdpo_label_smoothing_formula():
    x = _random_logps()
    beta, eps = 0.5, 0.2
    h = (x.policy_chosen - x.policy_rejected) - (x.ref_chosen - x.ref_rejected)
    expected = -np.log(_sigmoid(beta * h)) * (1 - eps) - np.log(_sigmoid(-beta * h)) * eps
    np.testing.assert_allclose(preference_loss("sigmoid", x, LossHyper(beta, eps)), expected, rtol=1e-5)


def test_robust_loss_is_unbiased_under_label_flips():
    """rDPO: averaging the loss over a flip with probability ε of chosen/rejected gives back clean DPO."""
    x = _random_logps()
    flipped = x._replace(policy_chosen=x.policy_rejected, policy_rejected=x.policy_chosen,
                         ref_chosen=x.ref_rejected, ref_rejected=x.ref_chosen)
    eps = 0.3
    hyper = LossHyper(0.4, eps)
    expected = (1 - eps) * preference_loss("robust", x, hyper) + eps * preference_loss("robust", flipped, hyper)
    np.testing.assert_allclose(expected, preference_loss("sigmoid", x, LossHyper(0.4)), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["ipo", "sppo_hard"])
def test_squared_losses_vanish_at_their_targets(name):
    beta = 0.25
    tokens = np.array([3.0, 7.0], np.float32)
    if name == "ipo":  # per-token log-ratio difference 1/(2β)
        x = _logps([-5.0, -9.0], [-5.0, -9.0], [-5.0 - tokens[0] / (2 * beta), -9.0], [-5.0, -9.0 + 7.0 / (2 * beta)],
                   tokens, tokens)
    else:  # chosen log-ratio +1/(2β), rejected −1/(2β)
        x = _logps([-3.0, -8.0], [-6.0, -10.0], [-3.0 - 2.0, -8.0 - 2.0], [-6.0 + 2.0, -10.0 + 2.0])
    np.testing.assert_allclose(preference_loss(name, x, LossHyper(beta)), 0.0, atol=1e-5)


def test_apo_and_bco_limits():
    big = _logps([0.0], [-100.0], [-100.0], [0.0])  # chosen far up, rejected far down
    # NCA also penalises a chosen reward far above 0 (its −½·log σ(−βc) term): 100 / 2
    for name, limit in (("apo_zero", 0.0), ("bco_pair", 0.0), ("hinge", 0.0), ("nca_pair", 50.0)):
        np.testing.assert_allclose(preference_loss(name, big, LossHyper(1.0)), limit, atol=1e-4, err_msg=name)
    equal = _logps([-5.0], [-5.0], [-5.0], [-5.0])  # policy == reference
    np.testing.assert_allclose(preference_loss("apo_down", equal, LossHyper(1.0)), 1.0, atol=1e-6)
    np.testing.assert_allclose(preference_loss("exo_pair", equal, LossHyper(1.0, 0.1)),
                               0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1), rtol=1e-5)


def test_sft_weight_adds_the_token_mean_nll():
    x = _random_logps()
    hyper = LossHyper(0.1)
    extra = preference_loss("sigmoid", x, hyper, sft_weight=0.5) - preference_loss("sigmoid", x, hyper)
    np.testing.assert_allclose(extra, -0.5 * x.policy_chosen * 0.25, rtol=1e-5)


def test_every_loss_is_finite_and_differentiable():
    """Pair losses on random log-probs; the unpaired ones (maxdpo/dpo/unpaired.py) on z = reward - anchor, up to
    the extremes."""
    x = _random_logps()
    z = jnp.concatenate([jnp.asarray(x.policy_chosen - x.ref_chosen), jnp.asarray([-1e4, 1e4])])
    for name in LOSS_NAMES:
        hyper = LossHyper(0.1, 1e-3 if name == "exo_pair" else 0.0)  # discopop: tau 0.05 by default
        if LOSSES[name].unpaired:
            values = LOSSES[name].fn(z, hyper)
            grads = jax.grad(lambda v: jnp.sum(LOSSES[name].fn(v, hyper)))(z)
            assert np.isfinite(values).all() and np.isfinite(grads).all() and (values >= 0).all(), name
            continue
        values = preference_loss(name, x, hyper)
        grads = jax.grad(lambda pc: jnp.sum(preference_loss(name, x._replace(policy_chosen=pc), hyper)))(
            jnp.asarray(x.policy_chosen))
        assert values.shape == (64,) and np.isfinite(values).all() and np.isfinite(grads).all(), name


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_sorts_the_real_pairs_only(name):
    """Padding slots (pair mask 0), wherever packing leaves them, take no part: the real slots get, in order,
    the losses of the sorted real values, the padding slots 0; the sorted differences are those of the sorted
    real values (paired: policy minus reference log-ratio margins)."""
    x = _random_logps(8)
    real_slots = np.array([0, 1, 3, 4, 5, 7, 8, 10])  # padding at 2, 6, 9: mid-row, as packing leaves it

    def spread(values, fill):  # the 8 real values on their slots, `fill` on the padding ones
        out = np.full(11, fill, np.float32)
        out[real_slots] = values
        return out
    padded = PairLogps(*(spread(v, fill) for v, fill in zip(x[:6], (-1.0, -90.0, -5.0, -2.0, 0.0, 0.0))),
                       x.sft_scale, pair_mask=spread(1.0, 0.0))
    hyper = LossHyper(0.3, 0.1)
    real = preference_loss(name, x, hyper)
    with_padding = preference_loss(name, padded, hyper)
    np.testing.assert_allclose(with_padding[real_slots], real, rtol=1e-6)
    np.testing.assert_array_equal(np.delete(with_padding, real_slots), 0.0)
    if name == "aot":
        delta = (np.sort(x.policy_chosen - x.policy_rejected) - np.sort(x.ref_chosen - x.ref_rejected)) * 0.3
        np.testing.assert_allclose(real, 0.9 * np.logaddexp(0, -delta) + 0.1 * np.logaddexp(0, delta), rtol=1e-5)


def test_discopop_and_forward_kl_stay_finite_at_extreme_margins():
    """DiscoPOP's m·exp(−z) where exp(−z) overflows and m underflows, and forward KL's 1 − exp(−c) at a chosen
    log-ratio of −200 nats: finite losses and gradients (TRL's formulas give NaN / inf there)."""
    x = _logps([-300.0, -10.0], [-10.0, -300.0], [-100.0, -10.0], [-10.0, -10.0])
    for name, hyper in (("discopop", LossHyper(1.0)), ("sigmoid", LossHyper(0.1, f_divergence_type="forward_kl"))):
        value, grad = jax.value_and_grad(lambda pc: jnp.sum(preference_loss(name, x._replace(policy_chosen=pc),
                                                                            hyper)))(jnp.asarray(x.policy_chosen))
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name


def test_f_divergences_are_their_derivatives_of_the_likelihood_ratio():
    """f-DPO: sigmoid on f'(u_w) − f'(u_l), u = πθ/π_ref: forward KL 1 − 1/u, JS log(2u/(1+u)), α (u^(α−1) − 1)/(α−1)."""
    x = _random_logps()
    u_w = np.exp((x.policy_chosen - x.ref_chosen).astype(np.float64))
    u_l = np.exp((x.policy_rejected - x.ref_rejected).astype(np.float64))
    derivatives = {"forward_kl": lambda u: 1 - 1 / u, "js_divergence": lambda u: np.log(2 * u / (1 + u)),
                   "alpha_divergence": lambda u: (u ** (0.3 - 1) - 1) / (0.3 - 1)}
    for kind, derivative in derivatives.items():
        z = 0.1 * (derivative(u_w) - derivative(u_l))
        got = preference_loss("sigmoid", x, LossHyper(0.1, f_divergence_type=kind, f_alpha_divergence_coef=0.3))
        np.testing.assert_allclose(got, np.logaddexp(0, -z), rtol=2e-4, atol=1e-5, err_msg=kind)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown dpo.loss 'dpoo'"):
        preference_loss("dpoo", _random_logps(), LossHyper(0.1))
