"""The built-in engine's tokens and log-probs equal a cache-free float64-checked recomputation
with the same megatron model: greedy = argmax, log-probs = log_softmax(full forward)."""
import warnings
from dataclasses import replace

import pytest
import torch

from megatron_rl.config import load_config
from megatron_rl.parallel import state
from megatron_rl.rollout import SamplingParams
from megatron_rl.rollout.builtin import BuiltinEngine, filter_logits, sample_from

warnings.filterwarnings("ignore")
VOCAB = 300  # < padded 384: padded columns must never be sampled


# qwen3: the KV cache path also runs the per-head q/k norms (and a head dim apart from
# hidden / heads)
@pytest.fixture(scope="module", params=[[], ["model.arch=qwen3", "model.kv_channels=32"]],
                ids=["qwen2", "qwen3"])
def model(request):
    from megatron_rl.models.gpt import build_gpt_model

    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.num_layers=2", *request.param],
                      world_size=1)
    state.initialize(cfg.parallel)
    m = build_gpt_model(cfg.model, cfg.parallel)
    yield m
    state.destroy()


def full_forward_logprobs(model, sequence, temperature):
    tokens = torch.tensor([sequence])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(sequence))[None], None)[0, :, :VOCAB].double()
    return torch.log_softmax(logits / temperature, -1)


PROMPTS = [[5, 17, 3], [9], [4, 4, 4, 4, 4, 8], [250, 1]]


def test_greedy_matches_argmax_of_full_forward(model):
    engine = BuiltinEngine(model, vocab_size=VOCAB)
    samples = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=7))
    assert len(samples) == 4
    for prompt, s in zip(PROMPTS, samples):
        assert s.prompt_ids == prompt and len(s.output_ids) == 7 and s.finish_reason == "length"
        seq = prompt + s.output_ids
        ref = full_forward_logprobs(model, seq, 1.0)
        for j, tok in enumerate(s.output_ids):
            row = ref[len(prompt) + j - 1]
            assert tok == int(row.argmax())
            assert s.output_logprobs[j] == pytest.approx(float(row[tok]), abs=1e-4)


def test_sampling_logprobs_stop_ids_and_n(model):
    engine = BuiltinEngine(model, vocab_size=VOCAB, seed=3)
    params = SamplingParams(temperature=0.7, max_new_tokens=12, n=3, stop_token_ids=(7, 11, 13))
    samples = engine.generate(PROMPTS[:2], params)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(s.output_ids) for s in samples[:3]}) > 1  # samples differ
    for s in samples:
        assert all(t < VOCAB for t in s.output_ids)
        if s.finish_reason == "stop":
            assert s.output_ids[-1] in (7, 11, 13)
            assert not set(s.output_ids[:-1]) & {7, 11, 13}
        else:
            assert len(s.output_ids) == 12 and not set(s.output_ids) & {7, 11, 13}
        ref = full_forward_logprobs(model, s.prompt_ids + s.output_ids, 0.7)
        for j, tok in enumerate(s.output_ids):
            assert s.output_logprobs[j] == pytest.approx(
                float(ref[len(s.prompt_ids) + j - 1, tok]), abs=1e-4)
    again = BuiltinEngine(model, vocab_size=VOCAB, seed=3).generate(PROMPTS[:2], params)
    assert [s.output_ids for s in again] == [s.output_ids for s in samples]  # seeded


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_p = filter_logits(logits, -1, 0.75).softmax(-1)
    torch.testing.assert_close(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    top_k = filter_logits(logits, 3, 1.0).softmax(-1)
    torch.testing.assert_close(top_k, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


@pytest.mark.parametrize("layout", ["race", "blocks"])
def test_sample_from_draws_each_token_with_its_probability(layout):
    # 5 entries: the exponential race; 2900 (> RACE_MAX_WIDTH): the blocked inverse CDF
    if layout == "race":
        probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    else:  # 3 blocks of 1024 (the last one padded), a block without mass, 500 small entries
        probs = torch.zeros(2900)
        probs[3], probs[2050], probs[2051:2551] = 0.4, 0.3, 0.3 / 500
        probs *= 2.0  # need not sum to 1
    draws, generator = 200_000, torch.Generator().manual_seed(0)
    # in chunks of 20k rows: 200k x 2900 at once would hold ~6 GB
    picks = torch.cat([sample_from(probs.expand(20_000, -1).contiguous(), generator)
                       for _ in range(draws // 20_000)])
    p = probs.double() / probs.double().sum()
    freq = torch.bincount(picks, minlength=len(p)).double() / draws
    assert (freq[p == 0] == 0).all()  # masked (and padded) entries are never drawn
    if layout == "blocks":  # the small entries as one group, and the three masses
        p = torch.stack([p[3], p[2050], p[2051:2551].sum()])
        freq = torch.stack([freq[3], freq[2050], freq[2051:2551].sum()])
    sigma = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), freq


def test_bad_requests(model):
    engine = BuiltinEngine(model, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1]], SamplingParams(max_new_tokens=10_000))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


# 32 prompts of 1-5 tokens: batches of 32 rows, a multiple of COMPACT_ROWS (8)
MANY = [[(7 * i + 3 * j) % VOCAB + 1 for j in range(1 + i % 5)] for i in range(32)]


def decode_both(model, prompts, params, **kwargs):
    """(compacted, static) samples of two engines with the same seed, and the compacted
    engine's decode batch step by step."""
    compacted = BuiltinEngine(model, vocab_size=VOCAB, seed=4, **kwargs)
    got = compacted.generate(prompts, params)
    want = BuiltinEngine(model, vocab_size=VOCAB, seed=4, compact=False).generate(prompts, params)
    return got, want, compacted._decode_rows


@pytest.mark.parametrize("sampling", ["greedy", "T=1", "top-k/top-p"])
def test_finished_rows_leave_the_batch_with_the_static_batchs_samples(model, sampling):
    """Token for token and bit for bit the static batch's samples, with rows leaving the decode
    batch; the sampled log-probs are the cache-free forward's."""
    if sampling == "greedy":  # the random model repeats a token: stop half the rows at once
        free = BuiltinEngine(model, vocab_size=VOCAB).generate(
            MANY, SamplingParams(temperature=0.0, max_new_tokens=10))
        stops = tuple({s.output_ids[0] for s in free[:8]} - {s.output_ids[0] for s in free[8:]})
        params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=stops)
    else:  # ~1 in 8 tokens stops a sequence
        params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2,
                                stop_token_ids=tuple(range(3, VOCAB, 8)),
                                **({"top_k": 50, "top_p": 0.9} if sampling == "top-k/top-p"
                                   else {}))
    got, want, decode_rows = decode_both(model, MANY[: 32 // params.n], params)
    assert [(s.output_ids, s.output_logprobs, s.finish_reason) for s in got] == \
        [(s.output_ids, s.output_logprobs, s.finish_reason) for s in want]
    # rows did leave; while sampling, at several steps (each compaction indexes the last one's)
    assert len(set(decode_rows) - {32}) >= (1 if sampling == "greedy" else 2)
    assert all(r % 8 == 0 for r in decode_rows) and decode_rows == sorted(decode_rows)[::-1]
    longest = max(len(s.output_ids) for s in got)
    assert len(decode_rows) == longest - 1  # the first token comes from the prompt pass
    temperature = params.temperature or 1.0
    for s in (got[0], max(got, key=lambda s: len(s.output_ids))):
        ref = full_forward_logprobs(model, s.prompt_ids + s.output_ids, temperature)
        for j, tok in enumerate(s.output_ids):
            assert s.output_logprobs[j] == pytest.approx(
                float(ref[len(s.prompt_ids) + j - 1, tok]), abs=1e-4)


def test_a_batch_of_another_size_stays_whole(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=tuple(range(0,
                                                                                      VOCAB, 4)))
    got, want, decode_rows = decode_both(model, MANY[:12], params)
    assert [s.output_ids for s in got] == [s.output_ids for s in want]
    assert set(decode_rows) == {12}


@pytest.mark.parametrize("width", [20, 2900], ids=["race", "blocks"])
def test_sample_from_rows_uses_each_rows_draw_of_the_whole_batch(width):
    probs = torch.rand(16, width, generator=torch.Generator().manual_seed(1)) ** 4
    whole = sample_from(probs, torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 3, 4, 9, 15])
    some = sample_from(probs[rows], torch.Generator().manual_seed(2), rows, 16)
    assert torch.equal(some, whole[rows])


def test_direct_decode_steps_have_the_module_steps_bits(model):
    """_decode_direct (the modules' tensors, read directly) gives the logits and cache entries of
    _decode_stage (through megatron's modules) to the bit, with a padding mask, at a batch of 8
    and of 32; and the engine's samples are the same either way."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron_rl.rollout.builtin import _direct_stage

    model.eval()
    for batch in (8, 32):
        width, total = 5, 12
        prompts = MANY[:batch]
        pad = torch.tensor([width - len(p) for p in prompts])
        tokens = torch.zeros(batch, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, int(pad[i]):] = torch.tensor(p)
        hidden = torch.arange(total)[None, :] < pad[:, None]
        mask = hidden[:, None, None, :width] | torch.ones(width, width, dtype=torch.bool).triu(1)
        positions = (torch.arange(width)[None, :] - pad[:, None]).clamp(min=0)
        with torch.no_grad():
            context = StaticInferenceContext(batch, width)
            model(tokens, positions, mask, inference_context=context)
            freqs = model.rotary_pos_emb(total)
            stage = _direct_stage(model, freqs)
            assert stage is not None  # megatron's local spec: the direct path runs
            through_modules, _ = BuiltinEngine._rotated_cache(model, context, width, total, freqs)
            direct = [(k.clone(), v.clone()) for k, v in through_modules]
            ids = tokens[:, -1]
            for t in range(width, total):
                keys_hidden = hidden[:, None, None, : t + 1]
                want = BuiltinEngine._decode_stage(model, None, ids, t, through_modules, freqs,
                                                   keys_hidden)
                got = BuiltinEngine._decode_direct(model, stage, None, ids, t, direct,
                                                   keys_hidden)
                assert torch.equal(got, want), (batch, t)
                ids = want[:, 0].argmax(-1)
            assert all(torch.equal(a, b) for layer in zip(direct, through_modules)
                       for a, b in zip(*layer))
    model.train()
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2,
                            stop_token_ids=tuple(range(3, VOCAB, 8)))
    got, want = (BuiltinEngine(model, vocab_size=VOCAB, seed=4, direct=direct).generate(
        MANY[:16], params) for direct in (True, False))
    assert [(s.output_ids, s.output_logprobs, s.finish_reason) for s in got] == \
        [(s.output_ids, s.output_logprobs, s.finish_reason) for s in want]


@pytest.mark.parametrize("prompts", [3, 16])
def test_a_prompts_samples_share_its_prompt_pass_with_the_bits_of_copies(model, prompts):
    """n samples of a prompt (one prompt pass over the prompts, padded to 8 rows: 3 -> 8,
    16) are token for token and bit for bit those of n copies of it (a pass over every row)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=8,
                            stop_token_ids=tuple(range(3, VOCAB, 8)))
    shared = BuiltinEngine(model, vocab_size=VOCAB).generate(MANY[:prompts], params, seed=2)
    copies = BuiltinEngine(model, vocab_size=VOCAB).generate(
        [p for p in MANY[:prompts] for _ in range(8)], replace(params, n=1), seed=2)
    assert [(s.output_ids, s.output_logprobs, s.finish_reason) for s in shared] == \
        [(s.output_ids, s.output_logprobs, s.finish_reason) for s in copies]
