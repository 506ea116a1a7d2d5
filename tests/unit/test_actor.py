"""The actor's shortcuts change nothing: Clip-Cov / KL-Cov on the weights that computed the old
log-probs skip their no-grad forward with the same selection, loss and update, bit for bit; the
chunked log-prob path (hidden states -> output_layer_logprobs_entropy, no logits) gives the
logits path's log-probs, entropies, loss and gradients (float64: to round-off; float32 through
DDP and megatron's Adam: within float32 tolerance)."""
import functools
import warnings
from types import SimpleNamespace

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


def config(*overrides):
    return load_config(None, [f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=8",
                              *overrides], world_size=1)


@pytest.fixture
def two_policies(request):
    """Two (DDP model, optimizer) pairs with the same weights in a 1-rank process group
    (config overrides: the test's `overrides` parameter, if any)."""
    cfg = config(*getattr(request, "param", ()))
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


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_logprobs_equal_the_logits_path_in_float64(tied):
    """The bare model in float64, a padded vocabulary (37 of 40 columns), temperature 0.9,
    blocks of 7 tokens x 16 columns: log-probs, entropies, a loss of both and every parameter's
    gradient agree to float64 round-off."""
    from megatron.core import parallel_state as mpu

    from megatron_rl.ops import vocab_parallel_logprobs_entropy
    from megatron_rl.training.step import causal_position_ids

    vocab = 37
    cfg = load_config(None, [f"model.vocab_size={vocab}", "model.make_vocab_size_divisible_by=8",
                             f"model.tie_word_embeddings={str(tied).lower()}"], world_size=1)
    state.initialize(cfg.parallel)
    try:
        model = build_gpt_model(cfg.model, cfg.parallel).double()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (3, 11), generator=g)
        batch = SimpleNamespace(tokens=tokens, targets=torch.randint(0, vocab, (3, 11),
                                                                    generator=g))
        weights = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
        results = []
        for chunked in (False, True):
            model.zero_grad(set_to_none=True)
            if chunked:
                processor = actor.HiddenStateLogprobs(0.9, vocab, token_chunk=7, vocab_chunk=16)
                logprobs, entropy = model(tokens, causal_position_ids(tokens), None,
                                          output_processor=processor,
                                          output_processor_context=batch)
            else:
                logits = model(tokens, causal_position_ids(tokens), None)
                logprobs, entropy = vocab_parallel_logprobs_entropy(
                    logits, batch.targets, 0.9, group=mpu.get_tensor_model_parallel_group(),
                    vocab_size=vocab)
            loss = (weights[0] * logprobs + weights[1] * entropy).sum()
            loss.backward()
            results.append([logprobs, entropy, loss] + [p.grad for p in model.parameters()])
        assert results[1][0].dtype == torch.float64 and results[1][0].shape == (3, 11)
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    finally:
        state.destroy()


@pytest.mark.parametrize("two_policies", [["training.adam_eps=1e-5"]], indirect=True)
@pytest.mark.parametrize("blocks", [{}, dict(token_chunk=5, vocab_chunk=16)],
                         ids=["one-block", "blocks"])
def test_chunked_actor_matches_the_logits_path(two_policies, blocks, monkeypatch):
    """compute_logprobs and train_mini_batch (DDP, megatron Adam, float32) on both paths: the old
    log-probs, the update's metrics and the updated weights agree within float32 tolerance
    (Adam's eps well above the round-off of the smallest gradients, as in the layout tests);
    with the logits in one block (the default block size here), bit for bit."""
    monkeypatch.setattr(actor, "HiddenStateLogprobs",
                        functools.partial(actor.HiddenStateLogprobs, **blocks))
    cfg = AlgorithmConfig(loss_mode="ppo_clip", entropy_coef=0.01)
    runs = []
    for (model, optimizer), chunked in zip(two_policies, (False, True)):
        minis = mini_batches()
        olds = []
        for mini in minis:
            for mb, lp in zip(mini, actor.compute_logprobs(model, mini, 0.9, VOCAB,
                                                           chunked=chunked)):
                mb.old_logprobs = lp
                olds.append(lp)
        metrics = [actor.train_mini_batch(model, optimizer, mini, cfg, 0.9, VOCAB, seed=index,
                                          chunked=chunked)
                   for index, mini in enumerate(minis)]
        runs.append(dict(old=torch.cat(olds), metrics=metrics,
                         weights=[p.detach().clone() for p in model.parameters()]))
    logits_path, chunked_path = runs
    if not blocks:
        assert torch.equal(chunked_path["old"], logits_path["old"])
        assert chunked_path["metrics"] == logits_path["metrics"]
        assert all(torch.equal(a, b) for a, b in zip(chunked_path["weights"],
                                                     logits_path["weights"]))
    torch.testing.assert_close(chunked_path["old"], logits_path["old"], rtol=1e-5, atol=1e-5)
    for want, got in zip(logits_path["metrics"], chunked_path["metrics"]):
        assert want.keys() == got.keys() and want["update_ok"] == got["update_ok"] == 1.0
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for want, got in zip(logits_path["weights"], chunked_path["weights"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("two_policies", [["model.tie_word_embeddings=false"],
                                          []], indirect=True, ids=["untied", "tied"])
def test_update_overwrites_the_logits_with_their_gradient(two_policies, monkeypatch):
    """train_mini_batch's backward writes the logits' gradient over the model's logits (the op's
    inplace_backward; the old-log-probs forward has no backward) and the update is bit for bit
    the one with a separate gradient tensor (metrics, updated weights)."""
    cfg = AlgorithmConfig(loss_mode="ppo_clip", entropy_coef=0.01, kl_ref_coef=0.0)
    original = actor.vocab_parallel_logprobs_entropy
    calls = []

    def spying(logits, *args, inplace_backward=False, force_inplace=None, **kwargs):
        inplace = inplace_backward if force_inplace is None else force_inplace
        if logits.requires_grad:  # the update's forward: record where the gradient lands
            record = dict(inplace=inplace_backward, logits=logits.data_ptr())
            logits.register_hook(lambda grad: record.update(grad=grad.data_ptr()))
            calls.append(record)
        return original(logits, *args, inplace_backward=inplace, **kwargs)

    runs = []
    for (model, optimizer), inplace in zip(two_policies, (True, False)):
        monkeypatch.setattr(actor, "vocab_parallel_logprobs_entropy",
                            functools.partial(spying, force_inplace=None if inplace else False))
        calls.clear()
        minis = mini_batches()
        for mini in minis:
            for mb, lp in zip(mini, actor.compute_logprobs(model, mini, 0.9, VOCAB)):
                mb.old_logprobs = lp
        metrics = [actor.train_mini_batch(model, optimizer, mini, cfg, 0.9, VOCAB, seed=index)
                   for index, mini in enumerate(minis)]
        assert len(calls) == 4 and all(c["inplace"] for c in calls)  # the actor asks for it
        assert all((c["grad"] == c["logits"]) == inplace for c in calls)
        runs.append(dict(metrics=metrics,
                         weights=[p.detach().clone() for p in model.parameters()]))
    inplace_run, separate_run = runs
    assert all(m["update_ok"] == 1.0 for m in inplace_run["metrics"])
    assert inplace_run["metrics"] == separate_run["metrics"]
    assert all(torch.equal(a, b) for a, b in zip(inplace_run["weights"], separate_run["weights"]))
