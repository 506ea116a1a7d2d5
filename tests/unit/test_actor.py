"""The actor's shortcuts change nothing: Clip-Cov / KL-Cov on the weights that computed the old
log-probs skip their no-grad forward with the same selection, loss and update, bit for bit."""
import warnings

import pytest
import torch

from megatron_rl.algorithms import AlgorithmConfig
from megatron_rl.config import load_config
from megatron_rl.models.gpt import build_gpt_model
from megatron_rl.parallel import state
from megatron_rl.training import actor
from megatron_rl.training.optimizer import build_optimizer, wrap_ddp
from megatron_rl.training.rl_batch import MicroBatch

warnings.filterwarnings("ignore")
VOCAB = 40


@pytest.fixture
def two_policies():
    """Two (DDP model, optimizer) pairs with the same weights in a 1-rank process group."""
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=8"],
                      world_size=1)
    state.initialize(cfg.parallel)
    first = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    second = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    second.module.load_state_dict(first.module.state_dict())
    yield [(m, build_optimizer([m], cfg.training)) for m in (first, second)]
    state.destroy()


def mini_batches(count=2, micro=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        mini = []
        for _ in range(micro):
            tokens = torch.randint(0, VOCAB, (2, 12), generator=g)
            mask = (torch.rand(2, 12, generator=g) > 0.3).float()
            mini.append(MicroBatch(tokens=tokens, targets=torch.roll(tokens, -1, 1),
                                   loss_mask=mask,
                                   advantages=torch.randn(2, 1, generator=g) * mask,
                                   rollout_logprobs=torch.zeros(2, 12)))
        out.append(mini)
    return out


@pytest.mark.parametrize("loss_mode", ["clip_cov", "kl_cov"])
def test_first_update_skips_the_forward_with_the_same_result(two_policies, loss_mode,
                                                             monkeypatch):
    # A fifth of the tokens selected (Clip-Cov: from every token, bounds wide open).
    cfg = AlgorithmConfig(loss_mode=loss_mode, r=0.2, k=0.2, omega_low=-10.0, omega_high=10.0)
    forwards, losses = [], []
    original, original_loss = actor.compute_logprobs, actor.policy_loss

    def counting(*args, **kwargs):
        forwards.append(1)
        return original(*args, **kwargs)

    def recording_loss(*args, **kwargs):
        loss, stats = original_loss(*args, **kwargs)
        losses.append(loss.detach().clone())
        return loss, stats

    runs = []
    for (model, optimizer), shortcut in zip(two_policies, (False, True)):
        minis = mini_batches()
        for mini in minis:  # the old-log-probs phase: every mini-batch on the initial weights
            for mb, lp in zip(mini, actor.compute_logprobs(model, mini, 1.0, VOCAB)):
                mb.old_logprobs = lp
        # the premise: the forward the shortcut skips recomputes old_logprobs bit for bit
        again = actor.compute_logprobs(model, minis[0], 1.0, VOCAB)
        assert all(torch.equal(a, mb.old_logprobs) for a, mb in zip(again, minis[0]))
        monkeypatch.setattr(actor, "compute_logprobs", counting)
        monkeypatch.setattr(actor, "policy_loss", recording_loss)
        forwards.clear()
        losses.clear()
        metrics = [actor.train_mini_batch(model, optimizer, mini, cfg, 1.0, VOCAB, seed=index,
                                          old_is_current=shortcut and index == 0)
                   for index, mini in enumerate(minis)]
        monkeypatch.setattr(actor, "compute_logprobs", original)
        monkeypatch.setattr(actor, "policy_loss", original_loss)
        runs.append(dict(forwards=len(forwards), metrics=metrics, losses=torch.stack(losses),
                         selected=[mb.selected.clone() for mini in minis for mb in mini],
                         weights=[p.detach().clone() for p in model.parameters()]))
    full, short = runs
    assert (full["forwards"], short["forwards"]) == (2, 1)  # the second update still needs it
    assert all(m["update_ok"] == 1.0 for m in full["metrics"])
    assert all(int(s.sum()) > 0 for s in full["selected"])  # the check selects something
    assert full["metrics"] == short["metrics"]  # clip fractions, covariances, grad norm, ...
    assert torch.equal(full["losses"], short["losses"])  # each micro-batch's loss
    assert all(torch.equal(a, b) for a, b in zip(full["selected"], short["selected"]))
    assert all(torch.equal(a, b) for a, b in zip(full["weights"], short["weights"]))
