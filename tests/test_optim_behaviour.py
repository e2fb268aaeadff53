"""Options and guarantees of the optimizers: groups, noise, batch norm, resume, schedulers,
mixed precision, closures, validation and non-finite handling."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otmdr import OTMDR, SAM
from otmdr.optim import frozen_batchnorm
from conftest import ce, data, tiny_mlp


def test_groups_with_perturb_false_never_move_during_ascent():
    model = tiny_mlp()
    frozen = list(model[0].parameters())
    opt = OTMDR([{"params": frozen, "perturb": False}, {"params": model[2].parameters()}],
                torch.optim.SGD, lr=0.1, noise_std=0.01, model=model)
    for step in range(3):
        before = [p.detach().clone() for p in frozen]
        seen = []

        def loss_fn(b, *, seen=seen, before=before):  # bound now: opt.step calls it within this iteration
            seen.append(all(torch.equal(p, q) for p, q in zip(frozen, before)))
            return F.cross_entropy(model(b[0]), b[1])

        opt.step(loss_fn, batch=data(16, seed=step))
        assert seen == [True, True, True]  # two ascent passes and the final pass
        assert any(not torch.equal(p, q) for p, q in zip(frozen, before))  # ...but they are trained


def test_rho_scale_per_group():
    x, y = data(16)
    moves = {}
    for scale in (0.0, 1.0, 2.0):
        model = tiny_mlp()
        opt = SAM([{"params": model[0].parameters(), "rho_scale": scale}, {"params": model[2].parameters()}],
                  torch.optim.SGD, rho=0.05, lr=0.0, model=model)
        first = [p.detach().clone() for p in model[0].parameters()]
        shifts = []

        def loss_fn(b, *, model=model, first=first, shifts=shifts):  # bound now, as above
            pairs = zip(model[0].parameters(), first)
            shifts.append(torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in pairs)))
            return F.cross_entropy(model(b[0]), b[1])

        opt.step(loss_fn, batch=(x, y))
        moves[scale] = float(shifts[-1])  # how far group 0 moved at the final pass
    assert moves[0.0] == 0.0
    assert moves[2.0] == pytest.approx(2 * moves[1.0], rel=1e-9)


def test_noise_has_the_requested_std_and_is_reproducible():
    def noise(seed, std=0.02):
        torch.manual_seed(0)
        model = nn.Linear(500, 200, dtype=torch.float64)
        opt = OTMDR(model, torch.optim.SGD, rho=(0.0,), noise_std=std, lr=0.0, seed=seed)
        before = [p.detach().clone() for p in model.parameters()]
        F.mse_loss(model(torch.randn(4, 500, dtype=torch.float64)), torch.zeros(4, 200, dtype=torch.float64)).backward()
        opt.perturb()
        return torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)])

    a, b, c = noise(1), noise(1), noise(2)
    assert a.numel() == 100_200
    assert float(a.std()) == pytest.approx(0.02, rel=0.02)
    assert abs(float(a.mean())) < 3 * 0.02 / math.sqrt(a.numel())
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _bn_model():
    return tiny_mlp(batch_norm=True)


def _stats(model):
    bn = model[1]
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def _forward_stats(model, batches):
    """Running statistics after train-mode forwards on the given (weights, input) pairs."""
    for weights, x in batches:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p, w in zip(twin.parameters(), weights):
                p.copy_(w)
        twin.train()(x)
        model[1].load_state_dict(twin[1].state_dict())
    return _stats(model)


@pytest.mark.parametrize("policy,passes", [("ascent", [0, 1]), ("clean", [0]), ("all", [0, 1, 2]), ("none", [])])
def test_batchnorm_policies_leave_the_statistics_they_promise(policy, passes):
    model = _bn_model()
    x, y = data(16)
    reference = copy.deepcopy(model)
    weights_at_pass = []

    def loss_fn(b):
        weights_at_pass.append([p.detach().clone() for p in model.parameters()])
        inputs_at_pass.append(b[0])
        return F.cross_entropy(model(b[0]), b[1])

    inputs_at_pass: list[torch.Tensor] = []
    opt = OTMDR(model, torch.optim.SGD, lr=0.1, bn_policy=policy)
    opt.step(loss_fn, batch=(x, y))
    expected = _forward_stats(reference, [(weights_at_pass[i], inputs_at_pass[i]) for i in passes])
    got = _stats(model)
    assert got[2] == expected[2] == len(passes)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_batchnorm_policy_works_with_cumulative_momentum_none():
    model = _bn_model()
    model[1].momentum = None
    opt = SAM(model, torch.optim.SGD, rho=0.05, lr=0.1)  # clean pass only
    for step in range(3):
        opt.step(ce(model), batch=data(16, seed=step))
    assert int(model[1].num_batches_tracked) == 3


def test_frozen_batchnorm_context_for_custom_loops():
    model = _bn_model()
    before = _stats(model)
    with frozen_batchnorm(model):
        model(data(16)[0])
    after = _stats(model)
    assert after[2] == before[2] and torch.equal(after[0], before[0])


@pytest.mark.parametrize("options", [{}, {"noise_std": 0.01, "particles": 2}, {"adaptive": True}])
def test_resume_continues_exactly(options):
    def make():
        model = _bn_model()
        opt = OTMDR(model, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4, seed=7, **options)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    def train(model, opt, sched, steps):
        for step in steps:
            opt.step(ce(model), batch=data(16, seed=step))
            sched.step()

    model, opt, sched = make()
    train(model, opt, sched, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed_opt, resumed_sched = make()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert resumed_opt.step_count == 4
    train(resumed_model, resumed_opt, resumed_sched, range(4, 7))

    model_u, opt_u, sched_u = make()
    train(model_u, opt_u, sched_u, range(7))
    for a, b in zip(resumed_model.state_dict().values(), model_u.state_dict().values()):
        assert torch.equal(a, b)


def test_loading_a_plain_optimizer_state_is_a_clear_error():
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, lr=0.1)
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not saved by an otmdr optimizer"):
        opt.load_state_dict(plain)


@pytest.mark.parametrize("attach_to", ["wrapper", "base"])
def test_lr_scheduler_on_either_object_changes_the_rate_used(attach_to):
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.0, 0.0), lr=1.0)
    target = opt if attach_to == "wrapper" else opt.base_optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(target, lambda epoch: 0.1 ** epoch)
    x, y = data(16)
    weight = model[0].weight
    moves = []
    for _ in range(3):
        before = weight.detach().clone()
        opt.step(ce(model), batch=(x, y))
        i = weight.grad.abs().argmax()
        moves.append(float((before.flatten()[i] - weight.detach().flatten()[i]) / weight.grad.flatten()[i]))
        sched.step()
    assert moves == pytest.approx([1.0, 0.1, 0.01], rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_bf16_autocast_runs_on_cpu():
    model = tiny_mlp(dtype=torch.float32)
    opt = OTMDR(model, torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(b[0])
        assert logits.dtype == torch.bfloat16
        return F.cross_entropy(logits.float(), b[1])

    result = opt.step(loss_fn, batch=data(16, dtype=torch.float32))
    assert torch.isfinite(result.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_fp16_grad_scaler_skips_a_step_with_an_injected_inf():
    model = tiny_mlp(dtype=torch.float32, batch_norm=True)
    opt = OTMDR(model, torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    calls = []

    def loss_fn(b):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(b[0]).float(), b[1])
        calls.append(1)
        return loss * float("inf") if len(calls) == 1 else loss  # the first ascent pass overflows

    x, y = data(16, dtype=torch.float32)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_bn = _stats(model)
    opt.step(loss_fn, batch=(x, y), scaler=scaler)
    scaler.update()
    assert bool(opt.skipped)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before_params))
    assert _stats(model)[2] == before_bn[2] and torch.equal(_stats(model)[0], before_bn[0])
    assert scaler.get_scale() == 2.0 ** 9

    opt.step(loss_fn, batch=(x, y), scaler=scaler)  # a finite step goes through
    scaler.update()
    assert not bool(opt.skipped)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before_params))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_step_equals_unscaled_step():
    """Normalised ascent is invariant to the loss scale; only the final gradient is unscaled."""
    a, b = tiny_mlp(dtype=torch.float32), tiny_mlp(dtype=torch.float32)
    opt_a = OTMDR(a, torch.optim.SGD, lr=0.1)
    opt_b = OTMDR(b, torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = data(16, dtype=torch.float32)
    opt_a.step(ce(a), batch=(x, y))
    opt_b.step(ce(b), batch=(x, y), scaler=scaler)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_raises_and_leaves_the_weights():
    model = _bn_model()
    opt = OTMDR(model, torch.optim.SGD, lr=0.1)
    before = copy.deepcopy(model.state_dict())
    x, y = data(16)
    x[9] = float("nan")  # in the second half: the second ascent pass and the final pass
    with pytest.raises(FloatingPointError, match="non-finite gradient.*left unchanged"):
        opt.step(ce(model), batch=(x, y))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    opt.step(ce(model), batch=data(16))  # the optimizer is usable afterwards
    assert opt.step_count == 1


def test_closure_form_calls_the_closure_at_every_point_it_needs():
    model, twin = tiny_mlp(), tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_twin = SAM(twin, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x, y = data(16)
    calls = []

    def closure():  # as Lightning's automatic optimization: zero_grad inside, then backward
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        opt_twin.step(ce(twin), batch=(x, y))
    assert len(calls) == 6
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    otmdr = OTMDR(model, torch.optim.SGD, lr=0.1)
    calls.clear()
    otmdr.step(closure)
    assert len(calls) == 3  # two ascent steps + the final pass
    assert otmdr.passes_per_step(closure_form=True) == 3.0 and otmdr.passes_per_step() == 2.0


def test_structured_batches_and_extra_outputs():
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, lr=0.1)
    x, y = data(15)

    def loss_fn(b):
        assert b["meta"] == "kept" and len(b["inputs"][0]) == len(b["y"])
        logits = model(b["inputs"][0])
        return F.cross_entropy(logits, b["y"]), logits

    result = opt.step(loss_fn, batch={"inputs": [x], "y": y, "meta": "kept"})
    assert result.outputs.shape == (8, 4)  # the first half of 15 samples, rounded half up
    with pytest.raises(ValueError, match="disagree"):
        opt.step(loss_fn, batch={"inputs": [x], "y": y[:3], "meta": "kept"})
    # too small to split in halves: every ascent step uses the whole (1-sample) batch
    assert opt.step(loss_fn, batch={"inputs": [x[:1]], "y": y[:1], "meta": "kept"}).outputs.shape == (1, 4)


def test_gradient_clipping_applies_to_the_final_gradient():
    model = tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.0, lr=1.0, max_grad_norm=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(ce(model), batch=data(16))
    moved = math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(model.parameters(), before)))
    assert moved == pytest.approx(1e-3, rel=1e-4)


def test_ascent_interval_makes_plain_steps_in_between():
    model, twin = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, lr=0.1, ascent_interval=2)
    base = torch.optim.SGD(twin.parameters(), lr=0.1)
    calls = []

    def loss_fn(b):
        calls.append(len(b[0]))
        return F.cross_entropy(model(b[0]), b[1])

    x, y = data(16)
    opt.step(loss_fn, batch=(x, y))
    assert calls == [8, 8, 16]
    twin.load_state_dict(model.state_dict())
    calls.clear()
    result = opt.step(loss_fn, batch=(x, y))
    assert calls == [16] and float(result.perturbation_norm) == 0.0
    F.cross_entropy(twin(x), y).backward()
    base.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_wrapping_a_built_optimizer_shares_its_state():
    model = tiny_mlp()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = OTMDR(None, adam, model=model, rho=(0.01, 0.02))
    opt.step(ce(model), batch=data(16))
    assert opt.state is adam.state and opt.param_groups is adam.param_groups
    assert "exp_avg" in opt.state[next(model.parameters())]


def test_add_param_group_reaches_the_base_optimizer():
    model = tiny_mlp()
    opt = OTMDR(model[0].parameters(), torch.optim.SGD, lr=0.1, model=model)
    opt.add_param_group({"params": model[2].parameters(), "perturb": False})
    assert len(opt.base_optimizer.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.1
    opt.step(ce(model), batch=data(16))


@pytest.mark.parametrize("kwargs,message", [
    ({"rho": -0.1}, "rho must be non-negative"),
    ({"rho": (0.05, float("nan"))}, "rho must be finite"),
    ({"rho": ()}, "at least one value"),
    ({"split": (0.7, 0.6)}, "sum to at most 1"),
    ({"split": (1.0,)}, "one fraction per ascent step"),
    ({"particles": 0}, "particles must be an integer >= 1"),
    ({"bn_policy": "frozen"}, "unknown bn_policy 'frozen'"),
    ({"normalize": "global"}, "unknown normalize"),
    ({"reduce": "max"}, "unknown reduce"),
    ({"noise_std": -1.0}, "noise_std must be"),
    ({"ascent_interval": 0}, "ascent_interval"),
    ({"eps": 0.0}, "eps must be"),
])
def test_constructor_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OTMDR(tiny_mlp(), torch.optim.SGD, lr=0.1, **kwargs)


def test_group_options_are_validated():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="rho_scale"):
        OTMDR([{"params": model.parameters(), "rho_scale": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="perturb must be True or False"):
        OTMDR([{"params": model.parameters(), "perturb": "no"}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="SAM takes one radius"):
        SAM(model, torch.optim.SGD, rho=(0.1, 0.2), lr=0.1)


def test_step_without_passes_explains_the_three_forms():
    opt = OTMDR(tiny_mlp(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="perturb\\(\\).*descend\\(\\)"):
        opt.step()


def test_norm_groups_give_each_group_its_own_radius():
    """Per-member perturbation of an ensemble: every norm group moves by rho exactly."""
    x, y = data(16)
    model = tiny_mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = SAM([{"params": first, "norm_group": "a"}, {"params": second, "norm_group": "b"}],
              torch.optim.SGD, rho=0.05, lr=0.0, model=model)
    moved = {}

    def loss_fn(b):
        if "start" not in moved:
            moved["start"] = [p.detach().clone() for p in model.parameters()]
        else:
            now = [p.detach() for p in model.parameters()]
            diffs = [n - s for n, s in zip(now, moved["start"])]
            moved["a"] = float(torch.sqrt(sum((d ** 2).sum() for d in diffs[:2])))
            moved["b"] = float(torch.sqrt(sum((d ** 2).sum() for d in diffs[2:])))
        return F.cross_entropy(model(b[0]), b[1])

    opt.step(loss_fn, batch=(x, y))
    assert moved["a"] == pytest.approx(0.05, rel=1e-9) and moved["b"] == pytest.approx(0.05, rel=1e-9)
    one = SAM(tiny_mlp(), torch.optim.SGD, rho=0.05, lr=0.0)
    assert float(one.step(ce(one.model), batch=(x, y)).perturbation_norm) == pytest.approx(0.05, rel=1e-9)


def test_missing_model_warns_only_when_batch_norm_runs():
    import warnings

    x, y = data(8)
    plain = tiny_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no batch norm: nothing to warn about
        OTMDR(plain.parameters(), torch.optim.SGD, lr=0.1).step(ce(plain), batch=(x, y))
    with_bn = tiny_mlp(batch_norm=True)
    opt = OTMDR(with_bn.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.warns(UserWarning, match="without model=.*batch norm"):
        opt.step(ce(with_bn), batch=(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        opt.step(ce(with_bn), batch=(x, y))
    built_with_model = OTMDR(with_bn.parameters(), torch.optim.SGD, lr=0.1, model=with_bn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # model=... given: the policy applies, nothing to warn about
        built_with_model.step(ce(with_bn), batch=(x, y))


def test_a_misspelt_option_names_the_right_one():
    with pytest.raises(TypeError, match="unknown option normalise=.*did you mean normalize="):
        OTMDR(tiny_mlp().parameters(), torch.optim.SGD, lr=0.1, normalise="merged")
    with pytest.raises(TypeError, match="did you mean momentum="):
        OTMDR(tiny_mlp().parameters(), torch.optim.SGD, lr=0.1, momentun=0.9)
