"""A hypothesis state machine drives a model through register, training, project_, checkpoints,
deepcopy and remove, beside an unregistered shadow driven the same way with plain formulas."""

import copy

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from layers import scaled, weight_name
from torch import nn

import nwave_param as nwp
from nwave_param.loss import topology_loss, weight_magnitude_loss

LIMIT, GROUP = 0.9, 5


def make_model():
    torch.manual_seed(0)
    return scaled(nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)), 3)


def plain_penalty(model):
    """The spec's penalty (alpha = lam = 1) on the Linear weights, written out."""
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    count = sum(w.numel() for w in weights)
    magnitude = sum((w.abs() - LIMIT).relu().square().sum() for w in weights)
    topology = sum(
        torch.minimum(w[i : i + GROUP].relu().sum(0), (-w[i : i + GROUP]).relu().sum(0)).sum()
        for w in weights
        for i in range(0, w.shape[0], GROUP)
    )
    return magnitude / count + topology / count


@torch.no_grad()
def plain_project(model):
    """Clamp, then zero each block column's minority sign (a tie keeps the positive side)."""
    for m in model:
        if isinstance(m, nn.Linear):
            w = m.weight.clamp_(-LIMIT, LIMIT)
            for i in range(0, w.shape[0], GROUP):
                block = w[i : i + GROUP]
                keep_positive = block.clamp(min=0).sum(0) >= (-block).clamp(min=0).sum(0)
                block[(block < 0) & keep_positive] = 0.0
                block[(block > 0) & ~keep_positive] = 0.0


class Lifecycle(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.model, self.shadow = make_model(), make_model()
        self.reg = None
        self.exact = True  # no penalty step yet: the two must agree bit for bit
        self._optimizers()
        self.x, self.y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def _optimizers(self):
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.shadow_opt = torch.optim.SGD(self.shadow.parameters(), lr=0.05)

    def _step(self, with_penalty):
        for model, opt, penalty in (
            (self.model, self.opt, lambda: self.reg.penalty()),
            (self.shadow, self.shadow_opt, lambda: plain_penalty(self.shadow)),
        ):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(self.x), self.y)
            (loss + penalty() if with_penalty else loss).backward()
            opt.step()

    @precondition(lambda self: self.reg is None)
    @rule()
    def register(self):
        self.reg = nwp.register(self.model)

    @precondition(lambda self: self.reg is not None)
    @rule()
    def remove(self):
        self.reg.remove()
        self.reg = None

    @rule()
    def task_step(self):
        self._step(with_penalty=False)

    @precondition(lambda self: self.reg is not None)
    @rule()
    def penalty_step(self):
        self._step(with_penalty=True)
        self.exact = False

    @precondition(lambda self: self.reg is not None)
    @rule()
    def project(self):
        self.reg.project_()
        plain_project(self.shadow)

    @rule(into_registered=st.booleans())
    def checkpoint_round_trip(self, into_registered):
        """Save, then load into a fresh model, registered or not: the weights carry over exactly."""
        state = self.model.state_dict()  # registered keys while the model is registered
        fresh = make_model()
        if self.reg is not None or into_registered:
            nwp.register(fresh)  # registered keys load as they are, plain ones through the pre-hook
        fresh.load_state_dict(state)
        if self.reg is not None and not into_registered:
            nwp.registry_of(fresh).remove()
        self.model = fresh
        self.reg = nwp.registry_of(fresh) if into_registered else None
        self._optimizers()

    @rule()
    def deepcopy(self):
        self.model = copy.deepcopy(self.model)
        self.reg = nwp.registry_of(self.model) if self.reg is not None else None
        self._optimizers()

    @rule()
    def resync_from_shadow(self):
        """A plain checkpoint of the shadow, loaded into the model as it is."""
        self.model.load_state_dict(self.shadow.state_dict())
        self.exact = True

    @invariant()
    def weights_match_shadow(self):
        for mine, theirs in zip(self._weights(self.model), self._weights(self.shadow)):
            if self.exact:
                assert torch.equal(mine, theirs)
            else:
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)

    @invariant()
    def registry_matches_functional_forms(self):
        if self.reg is None:
            assert not any(isinstance(m, nwp.ChipConstraint) for m in self.model.modules())
            assert list(self.model.state_dict()) == list(self.shadow.state_dict())
            return
        p = self.reg.penalty_terms()
        assert torch.equal(weight_magnitude_loss(self.model), p.magnitude)
        assert torch.equal(topology_loss(self.model, 1.0), p.topology)
        torch.testing.assert_close(self.reg.penalty(), plain_penalty(self.model).detach(), rtol=1e-5, atol=1e-7)

    @staticmethod
    def _weights(model):
        return [p.detach() for _, p in sorted(_named(model).items())]


def _named(model):
    """Parameters by their plain names, whether the model is registered or not."""
    return {weight_name(name): p for name, p in model.named_parameters()}


Lifecycle.TestCase.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
test_lifecycle = Lifecycle.TestCase
