"""`rpg_train.reference`: when the reference policy is refreshed."""

import pytest
import torch

from rpg_train.reference import ReferencePolicy


def test_reference_policy_refresh_rules():
    policy = torch.nn.Linear(3, 2)
    assert ReferencePolicy(policy).is_old_policy
    every = ReferencePolicy(policy, "every_k", every_k=2)
    with torch.no_grad():
        policy.weight.add_(1.0)
    assert not every.after_optimizer_step(policy, 0.0)
    assert not torch.equal(every.model.weight, policy.weight)
    assert every.after_optimizer_step(policy, 0.0)
    assert torch.equal(every.model.weight, policy.weight) and every.updates == 1
    threshold = ReferencePolicy(policy, "kl_threshold", kl_threshold=0.1, kl_ema=0.5)
    assert not threshold.after_optimizer_step(policy, 0.1)  # average 0.1, not above
    assert threshold.after_optimizer_step(policy, 0.3)  # average 0.2
    fixed = ReferencePolicy(policy, "never")
    assert not any(fixed.after_optimizer_step(policy, 100.0) for _ in range(5))
    assert threshold.needs_kl and not every.needs_kl
    with pytest.raises(ValueError, match="token_kl"):
        threshold.after_optimizer_step(policy)
    restored = ReferencePolicy(policy, "every_k", every_k=2)
    restored.load_state_dict(every.state_dict())
    assert (restored.updates, restored.steps_since_update) == (every.updates, every.steps_since_update)
    with pytest.raises(ValueError, match="ref_update"):
        ReferencePolicy(policy, "never").load_state_dict(every.state_dict())
    wrapped = ReferencePolicy(policy, "never", wrap=lambda frozen: torch.nn.Sequential(frozen))
    assert isinstance(wrapped.model, torch.nn.Sequential) and not wrapped.model[0].weight.requires_grad
    with pytest.raises(ValueError, match="ref_update"):
        ReferencePolicy(policy, "sometimes")
