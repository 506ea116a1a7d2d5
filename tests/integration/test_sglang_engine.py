"""A real SGLang server (CPU, float32) against the megatron model it serves: greedy tokens and
log-probs agree, each weight-sync path lands the trainer's new weights and advances the version,
pause/abort/continue behave, a killed server is restarted with nothing lost, too many failures
stop with a clear error, and the server listens on loopback only."""
import os
import re
import signal
import threading
import time
import warnings

import psutil
import pytest
import torch

from megatron_rl.config import load_config
from megatron_rl.models.gpt import build_gpt_model
from megatron_rl.parallel import state
from megatron_rl.rollout import SamplingParams
from megatron_rl.rollout.builtin import BuiltinEngine
from megatron_rl.rollout.config import SGLangConfig
from megatron_rl.errors import EngineError
from megatron_rl.rollout.sglang_client import SGLangClient
from megatron_rl.rollout.weight_sync import hf_weights, write_hf_folder
from tests.torchrun import sglang_python

warnings.filterwarnings("ignore")
VOCAB = 300
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]


def serve(tmp, overrides, seed, num_engines=1, **sglang):
    """(model config, a random megatron model, an SGLangClient of servers with the same
    weights)."""
    python = sglang_python()
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=8",
                             *overrides], world_size=1)
    state.initialize(cfg.parallel)
    torch.manual_seed(seed)
    model = build_gpt_model(cfg.model, cfg.parallel)
    write_hf_folder(hf_weights(model, cfg.model), str(tmp / "hf"), cfg=cfg.model)
    engine = SGLangClient.launch(str(tmp / "hf"), SGLangConfig(
        python=python, dtype="float32", max_total_tokens=8192, startup_timeout_s=300,
        request_timeout_s=120, **sglang), str(tmp / "logs"), num_engines=num_engines)
    engine.disk_dir = str(tmp / "sync")
    return cfg, model, engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg, model, engine = serve(tmp_path_factory.mktemp("sglang"),
                               ["model.max_position_embeddings=1024"], seed=0)
    yield cfg, model, engine
    engine.shutdown()
    state.destroy()


@torch.no_grad()
def megatron_logprobs(model, ids, temperature=1.0):
    """log p(ids[t] | ids[:t]) for t >= 1 under logits / temperature, in float64."""
    tokens = torch.tensor([ids])
    logits = model(tokens, torch.arange(len(ids))[None], None)[0, :, :VOCAB].double()
    logp = torch.log_softmax(logits / temperature, -1)
    return logp[:-1].gather(-1, tokens[0, 1:, None])[:, 0]


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_greedy_tokens_and_logprobs_match_megatron(served):
    cfg, model, engine = served
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    ours = BuiltinEngine(model, vocab_size=VOCAB).generate(PROMPTS, greedy)
    theirs = engine.generate(PROMPTS, greedy)
    for a, b in zip(theirs, ours):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(a.output_logprobs), torch.tensor(b.output_logprobs),
                                   atol=2e-5, rtol=0)
        assert a.finish_reason == "length" and a.weight_version == engine.weight_version


def test_sampled_logprobs_match_megatron(served):
    cfg, model, engine = served
    samples = engine.generate(PROMPTS, SamplingParams(temperature=0.7, top_p=0.9,
                                                      max_new_tokens=16, n=2))
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    for s in samples:
        full = s.prompt_ids + s.output_ids
        expected = megatron_logprobs(model, full, 0.7)[len(s.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(s.output_logprobs, dtype=torch.float64), expected,
                                   atol=5e-5, rtol=0)


# bucket_mb 0.02 (20 KiB) splits the ~110 KiB model into several buckets: each server then has
# the next bucket's request queued while it still loads the previous one
@pytest.mark.parametrize("method,bucket_mb", [("distributed", 512), ("distributed", 0.02),
                                              ("tensor", 0.02), ("disk", 512)])
def test_weight_sync_lands_new_weights(served, method, bucket_mb, monkeypatch):
    cfg, model, engine = served
    monkeypatch.setattr(engine.cfg, "bucket_mb", bucket_mb)
    before = engine.prompt_logprobs(PROMPTS)
    perturb(model, seed=hash((method, bucket_mb)) % 1000)
    version = engine.weight_version + 1
    report = engine.update_weights(hf_weights(model, cfg.model), version, method=method,
                                   disk_dir=engine.disk_dir)
    assert report["bytes"] == sum(p.numel() * 4 for p in model.parameters()) - \
        (model.embedding.word_embeddings.weight.shape[0] - VOCAB) * cfg.model.hidden_size * 4
    if method != "disk":
        assert (report["buckets"] == 1) if bucket_mb == 512 else (report["buckets"] > 4)
    after = engine.prompt_logprobs(PROMPTS)
    for ids, old, new in zip(PROMPTS, before, after):
        if len(ids) < 2:
            continue
        expected = megatron_logprobs(model, ids)
        torch.testing.assert_close(torch.tensor(new, dtype=torch.float64), expected,
                                   atol=2e-5, rtol=0)
        assert (torch.tensor(new) - torch.tensor(old)).abs().max() > 1e-3  # it did change
    sample = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))[0]
    assert sample.weight_version == version == engine.weight_version


def _requests_served(server):
    """Sequences the server has prefilled, from its log (SGLang logs each prefill batch)."""
    with open(server.log_path) as f:
        return sum(int(n) for n in re.findall(r"Prefill batch, #new-seq: (\d+)", f.read()))


def _generate_in_thread(engine, params, prompts=PROMPTS):
    """Start a generation in a thread; returns (thread, {"samples"}, log offsets): the size of
    each server's log when it started, for wait_until_decoding."""
    offsets = [os.path.getsize(s.log_path) for s in engine.servers]
    out = {}
    thread = threading.Thread(target=lambda: out.update(samples=engine.generate(prompts, params)))
    thread.start()
    return thread, out, offsets


def wait_until_decoding(server, offset, timeout_s=300):
    """Block until the server's log shows a decode batch with running requests written after
    `offset`: generation is under way (SGLang logs one every 40 decode steps), so a fault
    injected now lands mid-rollout however fast the machine is."""
    pattern = re.compile(r"Decode batch.*#running-req: [1-9]")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(server.log_path) as f:
            f.seek(offset)
            if pattern.search(f.read()):
                return
        time.sleep(0.05)  # polling for the event, not waiting for time to pass
    raise AssertionError(f"no decode batch in {server.log_path} within {timeout_s}s")


def test_pause_abort_then_continue(served):
    cfg, model, engine = served
    long = SamplingParams(temperature=1.0, max_new_tokens=900)
    thread, out, offsets = _generate_in_thread(engine, long)
    wait_until_decoding(engine.servers[0], offsets[0])
    engine.pause(mode="abort")
    thread.join(60)
    assert not thread.is_alive()
    assert all(s.finish_reason == "abort" and len(s.output_ids) < 900 for s in out["samples"])
    engine.resume()
    # retract: running requests go back to the queue and finish after continue_generation
    thread, out, offsets = _generate_in_thread(engine, SamplingParams(max_new_tokens=200))
    wait_until_decoding(engine.servers[0], offsets[0])
    engine.pause(mode="retract")
    time.sleep(1.0)  # paused requests never finish: no speed makes this pass by itself
    assert thread.is_alive()  # paused, not finished
    engine.flush_cache()  # allowed while paused in retract mode
    engine.resume()
    thread.join(120)
    assert all(s.finish_reason == "length" and len(s.output_ids) == 200 for s in out["samples"])


def test_server_listens_on_loopback_only(served):
    _, _, engine = served
    server = engine.servers[0]
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    with pytest.raises(ValueError, match="every interface"):
        SGLangConfig(host="0.0.0.0")


def _kill(server):
    os.killpg(server.process.pid, signal.SIGKILL)


def test_killed_server_restarts_and_retries_with_current_weights(served):
    cfg, model, engine = served
    resynced = []

    def resync(index):
        resynced.append(index)
        engine.update_weights(hf_weights(model, cfg.model), engine.weight_version, engines=[index])

    engine.on_restart = resync
    prompts = [[i % 250 + 1, 7, 8] for i in range(24)]
    thread, out, offsets = _generate_in_thread(engine, SamplingParams(max_new_tokens=300),
                                               prompts)
    wait_until_decoding(engine.servers[0], offsets[0])
    old_pid = engine.servers[0].process.pid
    _kill(engine.servers[0])
    thread.join(300)
    assert not thread.is_alive()
    samples = out["samples"]
    assert len(samples) == 24 and all(len(s.output_ids) == 300 for s in samples)
    assert engine.restarts == 1 and resynced == [0] and engine.servers[0].process.pid != old_pid
    assert all(s.weight_version == engine.weight_version for s in samples)
    for ids, got in zip(PROMPTS[:1], engine.prompt_logprobs(PROMPTS[:1])):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   megatron_logprobs(model, ids), atol=2e-5, rtol=0)
    with open(engine.servers[0].log_path) as f:
        assert f.read().count("===== megatron-rl: starting") == 2  # both runs in one log


def test_too_many_failures_stop_with_a_clear_error(served):
    cfg, model, engine = served
    engine.cfg.max_restarts = engine.restarts  # no restart left
    _kill(engine.servers[0])
    with pytest.raises(EngineError, match="max_restarts"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))


def test_router_spreads_requests_and_a_killed_server_is_restarted_and_resynced(tmp_path):
    """Two servers behind sglang_router: both serve, every sample carries the synced version,
    a server killed mid-rollout is restarted and re-synced with all samples complete, and a
    killed router is restarted."""
    cfg, model, engine = serve(tmp_path, ["model.max_position_embeddings=1024"], seed=2,
                               num_engines=2, router="sglang_router", router_policy="round_robin")
    try:
        assert engine.router is not None and engine.router.alive()
        resynced = []

        def resync(index):
            resynced.append(index)
            engine.update_weights(hf_weights(model, cfg.model), engine.weight_version,
                                  engines=[index])

        engine.on_restart = resync
        perturb(model, seed=4)
        engine.update_weights(hf_weights(model, cfg.model), 1, method="distributed")
        served_before = [_requests_served(s) for s in engine.servers]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
        ours = BuiltinEngine(model, vocab_size=VOCAB).generate(PROMPTS * 4, greedy)
        theirs = engine.generate(PROMPTS * 4, greedy)
        assert [s.output_ids for s in theirs] == [s.output_ids for s in ours]
        assert all(s.weight_version == 1 for s in theirs)
        assert all(_requests_served(s) > n for s, n in zip(engine.servers, served_before))

        prompts = [[i % 250 + 1, 7, 8] for i in range(16)]
        thread, out, offsets = _generate_in_thread(engine, SamplingParams(max_new_tokens=300),
                                                   prompts)
        wait_until_decoding(engine.servers[1], offsets[1])
        _kill(engine.servers[1])
        thread.join(300)
        assert not thread.is_alive()
        samples = out["samples"]
        assert len(samples) == 16 and all(len(s.output_ids) == 300 for s in samples)
        assert all(s.weight_version == 1 for s in samples)
        assert resynced == [1] and engine.servers[1].alive()
        for ids, got in zip(PROMPTS[:2], engine.prompt_logprobs(PROMPTS[:2], engine=1)):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                       megatron_logprobs(model, ids), atol=2e-5, rtol=0)

        os.killpg(engine.router.process.pid, signal.SIGKILL)  # the router itself dies
        again = engine.generate(PROMPTS, greedy)
        assert engine.router.alive() and engine.restarts == 2
        assert [s.output_ids for s in again] == [s.output_ids for s in ours[:len(PROMPTS)]]
    finally:
        engine.shutdown()
    assert not engine.router.alive()


def test_qwen3_serves_and_syncs_through_the_same_mapping(tmp_path):
    """Qwen3 (per-head q/k RMSNorm, head_dim 32 != hidden / heads): SGLang's own Qwen3 loads
    the converter's HF names, at start and through a distributed sync."""
    cfg, model, engine = serve(tmp_path, ["model.arch=qwen3", "model.kv_channels=32",
                                          "model.tie_word_embeddings=false"], seed=1)
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
        ours = BuiltinEngine(model, vocab_size=VOCAB).generate(PROMPTS, greedy)
        assert [s.output_ids for s in engine.generate(PROMPTS, greedy)] == \
            [s.output_ids for s in ours]
        perturb(model, seed=3)
        engine.update_weights(hf_weights(model, cfg.model), 1, method="distributed")
        for ids, got in zip(PROMPTS[:3], engine.prompt_logprobs(PROMPTS[:3])):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                       megatron_logprobs(model, ids), atol=2e-5, rtol=0)
    finally:
        engine.shutdown()
