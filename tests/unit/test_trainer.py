"""The RL trainer's phases, one at a time, in one process (a 1-rank process group, no torchrun):
what each phase leaves behind, that train_step is their composition, that the trainer's own
state survives a checkpoint, that every metrics record (step 0's evaluation included) reaches
every sink, and that close() leaves nothing initialised on any exit path."""
import glob
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist

from megatron_rl.config import load_config
from megatron_rl.training.rl_batch import MicroBatch
from megatron_rl.training.trainer import RLTrainer

warnings.filterwarnings("ignore")


def tiny_config(tmp_path, *overrides):
    return load_config("tests/configs/tiny_addition.yaml", [
        "training.sft_steps=0", "training.steps=2", "training.eval_interval=0",
        "training.probe_interval=0", "rollout.prompts_per_step=4", "algorithm.n=4",
        "training.mini_batches=2", "training.micro_batch_size=2",
        f"training.output_dir={tmp_path / 'run'}", f"training.cache_dir={tmp_path / 'cache'}",
        *overrides], world_size=1, on_this_host=True)


@pytest.fixture
def trainer(tmp_path):
    trainer = RLTrainer(tiny_config(tmp_path))
    yield trainer
    trainer.close()


def weights(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_phases_leave_what_the_next_phase_reads(trainer):
    cfg = trainer.cfg
    batch = trainer.rollout(1)
    per_rank = cfg.rollout.prompts_per_step * cfg.algorithm.n
    assert len(batch.samples) == per_rank
    prompts = trainer.task.prompts_for_step(1, cfg.rollout.prompts_per_step)
    assert batch.answers == [prompts[s.prompt_index][1] for s in batch.samples]
    assert all(s.prompt_ids == prompts[s.prompt_index][0] for s in batch.samples)

    trainer.score(batch)
    decoded = [trainer.task.decode(s.output_ids) for s in batch.samples]
    assert batch.rewards.tolist() == trainer.task.score(decoded, batch.answers)

    trainer.advantages(batch)
    assert len(batch.mini_batches) == cfg.training.mini_batches
    micro = [mb for mini in batch.mini_batches for mb in mini]
    assert all(isinstance(mb, MicroBatch) and mb.tokens.shape[0] == 2 for mb in micro)
    # every response token of the step is under exactly one loss-mask entry (no group is
    # filtered when its rewards differ; filtered ones have a zero mask)
    response_tokens = sum(len(s.output_ids) for s in batch.samples)
    assert sum(float(mb.loss_mask.sum()) for mb in micro) <= response_tokens
    assert all(mb.old_logprobs is None for mb in micro)

    trainer.old_logprobs(batch)
    assert all(mb.old_logprobs is not None and mb.old_logprobs.shape == mb.targets.shape
               for mb in micro)
    # the built-in engine samples from these very weights: the trainer's recomputation agrees
    # with the engine's log-probs (float32 round-off apart)
    assert max(batch.logprob_diffs) < 1e-4

    before = weights(trainer)
    step_metrics, probe = trainer.train(1, batch)
    assert probe is None
    assert len(step_metrics) == cfg.training.ppo_epochs * cfg.training.mini_batches
    changed = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())]
    if any(m.get("num_tokens", 0) > 0 for m in step_metrics):
        assert any(changed)

    version = trainer.engine.weight_version
    trainer.sync_weights()
    assert trainer.engine.weight_version == version + 1


def test_train_step_is_the_phases_in_order(tmp_path):
    """Two trainers of one config: one runs train_step, the other the phases by hand; the same
    weights and the same rewards come out."""
    records, results = [], []
    for by_hand in (False, True):
        trainer = RLTrainer(tiny_config(tmp_path / str(by_hand)))
        try:
            if by_hand:
                batch = trainer.rollout(1)
                trainer.score(batch)
                trainer.advantages(batch)
                trainer.old_logprobs(batch)
                trainer.train(1, batch)
                trainer.sync_weights()
                records.append(float(batch.rewards.mean()))
            else:
                records.append(trainer.train_step(1)["reward_mean"])
                assert trainer.step == 1
            results.append(weights(trainer))
        finally:
            trainer.close()
    assert records[0] == records[1]
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_trainer_state_survives_a_checkpoint(tmp_path):
    trainer = RLTrainer(tiny_config(tmp_path))
    try:
        trainer.train_step(1)
        trainer.law_points = [(0.5, 0.25), (0.4, 0.5)]
        path = trainer.save()
        saved = trainer.state_dict()
        saved_weights = weights(trainer)
    finally:
        trainer.close()
    resumed = RLTrainer(tiny_config(tmp_path), resume="auto")
    try:
        assert resumed.step == 1 and resumed.start_step == 1
        assert resumed.state_dict() == saved
        assert resumed.engine.weight_version == saved["weight_version"] == 1
        assert all(torch.equal(a, b) for a, b in zip(saved_weights, weights(resumed)))
        assert os.path.isdir(path)
    finally:
        resumed.close()


def test_every_record_reaches_every_sink_step_0_included(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = RLTrainer(tiny_config(tmp_path, "training.steps=1", "training.eval_interval=1",
                                    "training.tensorboard=true"))
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "run"
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 1]
    events = EventAccumulator(glob.glob(str(run / "tensorboard" / "events.*"))[0])
    events.Reload()
    steps = [e.step for e in events.Scalars("eval_accuracy")]
    assert steps == [0, 1]
    assert [e.value for e in events.Scalars("eval_accuracy")] == pytest.approx(
        [r["eval_accuracy"] for r in records])


def test_close_releases_everything_on_every_exit_path(tmp_path):
    # a failed construction (a resume path with no checkpoint) closes what it built
    with pytest.raises(Exception):
        RLTrainer(tiny_config(tmp_path), resume=str(tmp_path / "no_such_checkpoint"))
    assert not dist.is_initialized()
    # a failed step: the caller's finally closes, and closing twice is harmless
    trainer = RLTrainer(tiny_config(tmp_path))
    trainer.task.score = lambda responses, answers: 1 / 0
    with pytest.raises(ZeroDivisionError):
        try:
            trainer.fit()
        finally:
            trainer.close()
    trainer.close()
    assert not dist.is_initialized()
    assert trainer.sinks._file.closed


def test_invalid_rewards_are_verifier_faults_not_poison(tmp_path):
    """NaN, inf and out-of-range rewards score 0 and are counted; the update still happens."""
    trainer = RLTrainer(tiny_config(tmp_path))
    try:
        check = trainer.task.score
        bad = [float("nan"), float("inf"), 1e30, -2.0]

        def scored(responses, answers):
            return bad + check(responses, answers)[len(bad):]

        trainer.task.score = scored
        record = trainer.train_step(1)
        assert trainer.reward_faults["invalid"] == 4 and record["reward/invalid_total"] == 4
        assert trainer.nonfinite_in_a_row == 0 and record.get("nonfinite_skipped", 0.0) == 0.0
        batch = trainer.rollout(2)
        trainer.score(batch)
        assert batch.rewards[:4].tolist() == [0.0] * 4 and torch.isfinite(batch.rewards).all()
    finally:
        trainer.close()


def test_a_diverged_run_stops_and_sets_its_checkpoints_aside(tmp_path):
    """lr 1e10: the first update ruins the weights while every number stays finite; rewards
    collapse to 0 and the guard stops the job, moving the checkpoint of the ruined weights out
    of --resume auto's way."""
    trainer = RLTrainer(tiny_config(tmp_path, "training.sft_steps=150", "training.lr=1e10",
                                    "training.steps=20", "training.checkpoint_interval=1",
                                    "training.divergence_steps=3"))
    try:
        with pytest.raises(SystemExit, match="looked diverged") as stop:
            trainer.fit()
    finally:
        trainer.close()
    root = tmp_path / "run" / "checkpoints"
    assert "every reward is 0" in str(stop.value)
    assert trainer.step < 20
    assert (root / "diverged" / "step_00000001").is_dir()
    assert not list(root.glob("step_*")) and not (root / "latest").exists()


def test_close_gives_the_signal_handlers_back(tmp_path):
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    trainer = RLTrainer(tiny_config(tmp_path))
    assert signal.getsignal(signal.SIGINT) == trainer._on_stop_signal
    trainer.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_the_held_out_set_logs_its_keys_and_what_the_evaluation_logged_before(tmp_path):
    """The trainer's evaluation goes through the evaluation sets (here the implicit held-out
    greedy set and its avg@2 at T=1): eval/heldout*/ keys, and eval_accuracy / eval_avg@2 with
    the values the evaluation before sets gives on the same engine, prompts and seed."""
    from megatron_rl.analysis.validation import evaluate
    from megatron_rl.seeds import derive_seed

    trainer = RLTrainer(tiny_config(tmp_path, "training.eval_avg_k=2",
                                    "training.eval_temperature=1.0"))
    try:
        record = trainer.evaluate(3)
        rc = trainer.cfg.rollout
        before = evaluate(trainer.engine, trainer.eval_prompts, trainer.task.decode,
                          trainer.score_texts, max_new_tokens=rc.max_new_tokens,
                          stop_token_ids=(trainer.task.eos_id,), avg_k=2, temperature=1.0,
                          seed=derive_seed(rc.seed, 3, 0, 7))
    finally:
        trainer.close()
    assert {k: record[k] for k in before} == before
    assert record["eval/heldout/accuracy"] == record["eval_accuracy"]
    assert record["eval/heldout_sampled/accuracy"] == record["eval_avg@2"]
    assert sorted(record) == sorted([
        "eval_accuracy", "eval_avg@2", "eval/heldout/accuracy", "eval/heldout/pass@1",
        "eval/heldout/response_tokens", "eval/heldout/truncated",
        "eval/heldout_sampled/accuracy", "eval/heldout_sampled/pass@2",
        "eval/heldout_sampled/response_tokens", "eval/heldout_sampled/truncated"])


def test_only_the_first_update_of_a_step_reuses_the_old_logprobs(tmp_path, monkeypatch):
    """Clip-Cov / KL-Cov skip their extra forward on the weights that computed old_logprobs:
    the first of a step's optimizer steps, not the later mini-batches or PPO epochs."""
    from megatron_rl.training import actor

    flags, original = [], actor.train_mini_batch

    def recording(*args, **kwargs):
        flags.append(kwargs.get("old_is_current", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(actor, "train_mini_batch", recording)
    trainer = RLTrainer(tiny_config(tmp_path, "training.ppo_epochs=2",
                                    "algorithm.loss_mode=kl_cov"))
    try:
        trainer.train_step(1)
    finally:
        trainer.close()
    assert flags == [True, False, False, False]  # 2 epochs x 2 mini-batches


@pytest.mark.parametrize("chunking", ["auto", "true"])
def test_trainer_takes_the_logprob_path_the_planner_plans(tmp_path, monkeypatch, chunking):
    """One config, the memory planner and the trainer: the log-prob path the plan assumes
    (chunked from hidden states, or full logits) is the one the trainer's old-log-prob,
    reference and training passes run ("auto" is off for this tiny model's logits)."""
    from megatron_rl.parallel.memory_plan import plan_memory
    from megatron_rl.training import actor

    calls = {"chunked": 0, "logits": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(actor, "output_layer_logprobs_entropy",
                        counting("chunked", actor.output_layer_logprobs_entropy))
    monkeypatch.setattr(actor, "vocab_parallel_logprobs_entropy",
                        counting("logits", actor.vocab_parallel_logprobs_entropy))
    cfg = tiny_config(tmp_path, f"training.logprob_chunking={chunking}",
                      "algorithm.kl_ref_coef=0.01")
    planned = plan_memory(cfg, 80).settings["chunked_logprobs"]
    assert planned == (chunking == "true")
    trainer = RLTrainer(cfg)
    try:
        trainer.train_step(1)
    finally:
        trainer.close()
    # per mini-batch: old, reference and training passes over its micro-batches
    taken, other = ("chunked", "logits") if planned else ("logits", "chunked")
    assert calls[taken] >= 3 * cfg.training.mini_batches and calls[other] == 0, calls
