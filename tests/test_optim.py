"""AdamW, schedules, warmup and clipping against torch.optim.AdamW + transformers' schedulers + clip_grad_norm_,
the optimizer TRL's DPOTrainer runs (norm scales without weight decay, as HF's Trainer groups them)."""
import jax
import numpy as np
import pytest
import torch
from transformers import get_scheduler

from maxdpo.config import OptimizerConfig
from maxdpo.dpo.optim import make_optimizer

HF_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@pytest.mark.parametrize("schedule,warmup", [("linear", {"warmup_ratio": 0.25}), ("cosine", {"warmup_steps": 3}),
                                             ("constant", {"warmup_steps": 2}), ("linear", {})])
def test_adamw_schedule_and_clipping_equal_torch_and_transformers(schedule, warmup):
    total = 12
    cfg = OptimizerConfig(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, schedule=schedule,
                          max_grad_norm=0.5, **warmup)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "attn_norm": rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) * rng.uniform(0.1, 3) for k, v in params.items()}
             for _ in range(total)]

    tx, lr_schedule = make_optimizer(cfg, total)
    ours, state = params, tx.init(params)
    update = jax.jit(tx.update)
    lrs = []
    for step, grad in enumerate(grads):
        lrs.append(float(lr_schedule(step)))
        updates, state = update(grad, state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)

    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    optimizer = torch.optim.AdamW([{"params": [torch_params["kernel"]], "weight_decay": cfg.weight_decay},
                                   {"params": [torch_params["attn_norm"]], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    warmup_steps = cfg.warmup_steps or int(np.ceil(cfg.warmup_ratio * total))
    scheduler = get_scheduler(HF_SCHEDULES[schedule], optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=total)
    torch_lrs = []
    for grad in grads:
        torch_lrs.append(scheduler.get_last_lr()[0])
        for name, param in torch_params.items():
            param.grad = torch.tensor(grad[name])
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs, torch_lrs, rtol=1e-6, atol=1e-9)
    for name, param in torch_params.items():
        np.testing.assert_allclose(ours[name], param.detach().numpy(), rtol=2e-5, atol=2e-6, err_msg=name)
