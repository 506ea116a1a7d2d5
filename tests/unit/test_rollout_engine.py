"""One shape for the loop: both engines have exactly RolloutEngine's methods with its signatures
(a drift in either fails here, not in a job), and build_rollout_engine picks and configures the
engine the config names."""
import inspect
import warnings

import pytest

from megatron_rl.config import load_config
from megatron_rl.parallel import state
from megatron_rl.rollout import SamplingParams
from megatron_rl.rollout import factory
from megatron_rl.rollout.builtin import BuiltinEngine
from megatron_rl.rollout.factory import build_rollout_engine
from megatron_rl.rollout.sglang_rollout import SGLangRolloutEngine
from megatron_rl.rollout.types import RolloutEngine

warnings.filterwarnings("ignore")
VOCAB = 300
ENGINES = [BuiltinEngine, SGLangRolloutEngine]


def protocol_methods():
    return {name: inspect.signature(member) for name, member in vars(RolloutEngine).items()
            if not name.startswith("_") and inspect.isfunction(member)}


def test_the_protocol_is_what_the_loop_calls():
    assert sorted(protocol_methods()) == ["generate", "prefetch", "shutdown", "update_weights"]
    assert RolloutEngine.__annotations__ == {"weight_version": int}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda cls: cls.__name__)
def test_engine_has_the_protocols_methods_and_signatures(engine):
    expected = protocol_methods()
    for name, signature in expected.items():
        assert inspect.signature(getattr(engine, name)) == signature, name
    # Nothing public beyond the protocol: the loop cannot come to rely on one engine's extras.
    public = {name for name, member in vars(engine).items()
              if not name.startswith("_") and callable(member)}
    assert public == set(expected)
    assert engine.__annotations__.get("weight_version") is int


@pytest.fixture(scope="module")
def model_and_cfg():
    from megatron_rl.models.gpt import build_gpt_model

    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.num_layers=2", "rollout.seed=3"],
                      world_size=1)
    state.initialize(cfg.parallel)
    yield build_gpt_model(cfg.model, cfg.parallel), cfg
    state.destroy()


def test_factory_builds_the_builtin_engine(model_and_cfg, tmp_path):
    model, cfg = model_and_cfg
    engine = build_rollout_engine(cfg, model, str(tmp_path), weight_version=5, device="cpu",
                                  vocab_size=VOCAB)
    assert type(engine) is BuiltinEngine and isinstance(engine, RolloutEngine)
    assert engine.weight_version == 5 and engine.vocab_size == VOCAB
    prompts = [[5, 17, 3], [9]]
    params = SamplingParams(temperature=0.7, max_new_tokens=6, n=2)
    assert engine.prefetch(prompts, params) is None  # nothing to start early...
    samples = engine.generate(prompts, params)
    # ...and no draw taken: the samples are those of a fresh engine with rollout.seed
    fresh = BuiltinEngine(model, vocab_size=VOCAB, seed=3).generate(prompts, params)
    assert [s.output_ids for s in samples] == [s.output_ids for s in fresh]
    assert all(s.weight_version == 5 for s in samples)
    engine.update_weights()
    assert engine.weight_version == 6
    assert engine.generate(prompts[:1], params, seed=1)[0].weight_version == 6
    engine.shutdown()
    assert list(tmp_path.iterdir()) == []  # the built-in engine writes nothing to the run folder


@pytest.mark.parametrize("configured,expected", [("auto", "cuda"), ("cpu", "cpu")])
def test_factory_builds_the_sglang_engine_on_the_configured_device(monkeypatch, configured,
                                                                   expected):
    """Without servers: the SGLang branch's arguments, with rollout.sglang.device=auto resolved
    to the trainer's device."""
    cfg = load_config(None, ["rollout.engine=sglang", f"rollout.sglang.device={configured}"],
                      world_size=1)
    calls = []
    monkeypatch.setattr(factory, "SGLangRolloutEngine",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or "engine")
    model = object()
    assert build_rollout_engine(cfg, model, "/run", weight_version=7, device="cuda",
                                vocab_size=VOCAB) == "engine"
    assert calls == [((cfg, model, "/run"), {"weight_version": 7, "device": expected})]


def test_sglang_engine_takes_back_released_memory_before_generating_again(monkeypatch):
    """Colocated engines release their memory after generating; a second generate() before the
    next weight sync (evaluation, dynamic sampling's extra rounds) resumes it first. Without
    servers: rank 0's bookkeeping against a client that records its calls."""
    from megatron_rl.rollout.types import Sample

    calls = []

    class Client:
        def generate(self, prompts, params):
            calls.append("generate")
            return [Sample(prompt_ids=list(p), prompt_index=i)
                    for i, p in enumerate(prompts) for _ in range(params.n)]

        def release_memory(self):
            calls.append("release")

        def resume_memory(self):
            calls.append("resume")

    engine = SGLangRolloutEngine.__new__(SGLangRolloutEngine)
    engine.cfg = load_config(None, ["rollout.engine=sglang"], world_size=1)
    engine.client, engine._prefetched, engine._released = Client(), None, False
    monkeypatch.setattr(engine, "_gather_prompts", lambda prompts: (0, {0: list(prompts)}))
    monkeypatch.setattr(engine, "_lead", lambda action, weights=None: action())
    params = SamplingParams(n=2)
    assert len(engine.generate([[1, 2]], params)) == 2
    assert engine.generate([], params) == []
    assert len(engine.generate([[3]], params)) == 2
    assert calls == ["generate", "release", "resume", "release", "resume", "generate", "release"]
