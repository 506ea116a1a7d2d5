"""megatron_rl.console: each silenced third-party warning is matched by its real text under the
module that raises it (triggered for real where that is cheap), nothing else is silenced (an
unrelated megatron warning, the same text from another module), and the package logger's
format, rank gating and idempotence."""
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_rl import console
from tests.torchrun import ROOT

TE_APEX = "Transformer Engine and Apex are not installed. Falling back to "
# (text, category, module) as megatron-core 0.19.2 and torch 2.13 raise them
REAL_WARNINGS = [
    (TE_APEX + "Torch optimizers.", UserWarning, "megatron.core.optimizer"),
    (TE_APEX + "local implementations of multi_tensor_applier and multi_tensor_scale",
     UserWarning, "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision"),
    (TE_APEX + "local implementations of multi_tensor_applier and multi_tensor_scale",
     UserWarning, "megatron.core.optimizer.optimizer"),
    (TE_APEX + "local implementations of multi_tensor_applier, multi_tensor_l2norm, and "
     "multi_tensor_scale", UserWarning, "megatron.core.optimizer.clip_grads"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning,
     "megatron.core.models.backends"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning,
     "megatron.core.models.gpt.gpt_layer_specs"),
    ("full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.",
     UserWarning, "megatron.core.transformer.transformer_config"),
    ("MimoModelConfig is experimental and still under active development. The API may change "
     "without notice in future releases.", UserWarning,
     "megatron.core.models.mimo.config.base_configs"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
     "`torch.distributed.all_gather_single` instead.", FutureWarning,
     "torch.distributed.c10d_logger"),
    ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
     "in a single process.", UserWarning, "torch.distributed.checkpoint.utils"),
    ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save "
     "in a single process.", UserWarning, "torch.distributed.checkpoint.utils"),
    ("The argument order of load has been changed. Please check the document to avoid future "
     "breakages.", UserWarning, "torch.distributed.checkpoint.logger"),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "torch.distributed.checkpoint.planner_helpers"),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "torch.distributed.checkpoint.default_planner"),
]
REAL_CPU_ONLY_WARNINGS = [
    ("When using async grad allreduce it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", UserWarning,
     "megatron.core.tensor_parallel.layers"),
]
# (logger, text) of the records megatron-core logs
REAL_LOG_RECORDS = [
    ("megatron.core.models.gpt.gpt_model",
     "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes, no new features. "
     "Please reference the migration guide `docs/user-guide/hybrid-model-migration.md` for "
     "details on how to use `HybridModel`"),
    ("megatron.core.dist_checkpointing.strategies.torch",
     "MCore's async save is deprecated and will be removed in the future releases. Please, use "
     "NVRx async solution by setting `async_strategy` to `nvrx`."),
]


@pytest.fixture
def clean_logging():
    """Restore the loggers console touches (its handler, level and megatron's filters)."""
    names = ["megatron_rl"] + [name for name, _ in console.SILENCED_LOG_RECORDS]
    saved = {name: (list(logging.getLogger(name).handlers), list(logging.getLogger(name).filters),
                    logging.getLogger(name).level) for name in names}
    handler = console._handler
    yield
    for name, (handlers, filters, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.filters[:] = handlers, filters
        logger.setLevel(level)
    console._handler = handler


def shown(text, category, module):
    """Whether warning `text` of `category`, raised from `module`, gets through the filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.silence_third_party_warnings()
        warnings.warn_explicit(text, category, "x.py", 1, module=module)
    return bool(caught)


@pytest.mark.parametrize("text, category, module", REAL_WARNINGS)
def test_each_known_warning_is_silenced(clean_logging, text, category, module):
    assert not shown(text, category, module)


@pytest.mark.parametrize("text, category, module", REAL_CPU_ONLY_WARNINGS)
def test_cuda_advice_is_silenced_only_without_cuda(clean_logging, monkeypatch, text, category,
                                                   module):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not shown(text, category, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert shown(text, category, module)


def test_every_filter_has_a_real_text():
    """A new filter comes with the text it is for (and so with a test)."""
    real = REAL_WARNINGS + REAL_CPU_ONLY_WARNINGS
    for message, category, module in console.SILENCED_WARNINGS + \
            console.SILENCED_WARNINGS_WITHOUT_CUDA:
        assert any(re.match(message, text, re.I) and re.match(module, mod) and cat is category
                   for text, cat, mod in real), message
    for name, pattern in console.SILENCED_LOG_RECORDS:
        assert any(n == name and re.match(pattern, text) for n, text in REAL_LOG_RECORDS), pattern


@pytest.mark.parametrize("text, category, module", [
    ("A new megatron-core notice the project should see", UserWarning, "megatron.core.optimizer"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron_rl.models.gpt"),
    ("Apex is not installed. Falling back to Torch Norm", RuntimeWarning,
     "megatron.core.models.backends"),
    ("something else about ShardedTensor", FutureWarning,
     "torch.distributed.checkpoint.planner_helpers"),
    ("full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.",
     UserWarning, "megatron.core.transformer.transformer_layer"),
])
def test_other_warnings_still_show(clean_logging, text, category, module):
    assert shown(text, category, module)


def test_real_checkpoint_warnings_are_silenced(clean_logging, tmp_path):
    """torch.distributed.checkpoint without a process group, the reader passed positionally as
    megatron does: torch's own calls raise the single-process and argument-order warnings."""
    import torch.distributed.checkpoint as dcp

    def save_and_load(silenced):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if silenced:
                console.silence_third_party_warnings()
            dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / f"c{silenced}", no_dist=True)
            state = {"w": torch.zeros(2)}
            dcp.load(state, dcp.FileSystemReader(tmp_path / f"c{silenced}"))
        assert torch.equal(state["w"], torch.ones(2))
        return [str(w.message) for w in caught]

    raw = save_and_load(silenced=False)
    assert any("save in a single process" in m for m in raw), raw
    assert any("load in a single process" in m for m in raw), raw
    assert any("argument order of load" in m for m in raw), raw
    assert save_and_load(silenced=True) == []


def test_megatron_core_imports_silently():
    """What ci/setup_env.sh's check does: megatron-core's import-time TE / apex notices (one
    process, since a module warns only the first time it is imported)."""
    script = ("from megatron_rl.console import silence_third_party_warnings\n"
              "silence_third_party_warnings()\n"
              "from megatron_rl.compat import apply_cpu_patches\n"
              "apply_cpu_patches()\n"
              "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr


def test_real_cuda_graph_default_warning_is_silenced(clean_logging):
    from megatron_rl.compat import apply_cpu_patches

    with warnings.catch_warnings():  # the import-time notices are the test above's
        console.silence_third_party_warnings()
        apply_cpu_patches()
        from megatron.core.transformer import TransformerConfig

    for silenced in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if silenced:
                console.silence_third_party_warnings()
            TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
        messages = [str(w.message) for w in caught if "full scope" in str(w.message)]
        assert len(messages) == (0 if silenced else 1), messages


@pytest.mark.parametrize("name, text", REAL_LOG_RECORDS)
def test_megatron_log_records_are_filtered(clean_logging, name, text):
    console.silence_third_party_warnings()
    console.silence_third_party_warnings()  # idempotent: one filter per logger
    logger = logging.getLogger(name)
    assert sum(isinstance(f, console.MessageFilter) for f in logger.filters) == 1

    def passes(logger_name, message):
        return bool(logging.getLogger(logger_name).filter(
            logging.LogRecord(logger_name, logging.WARNING, "x.py", 1, message, None, None)))

    assert not passes(name, text)
    assert passes(name, "an unrelated warning of the same module")
    assert passes("megatron.core.other", text)  # only the logger that logs it


def test_logger_format_rank_and_idempotence(clean_logging, capsys):
    log = logging.getLogger("megatron_rl.some_module")
    console.setup_logging(log_rank=False)
    log.info("info of another rank")
    log.warning("a warning of another rank")
    console.setup_logging(log_rank=True)  # replaces its handler: no line twice
    log.info("step 1: reward 0.5")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith(console.PREFIX) for line in lines)
    assert re.fullmatch(r"\[megatron-rl\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING a warning of "
                        r"another rank", lines[0]), lines[0]
    assert lines[1].endswith(" INFO step 1: reward 0.5")
    assert sum(isinstance(h, console.TqdmHandler)
               for h in logging.getLogger("megatron_rl").handlers) == 1


def test_log_lines_do_not_break_a_progress_bar(clean_logging, capsys):
    from tqdm import tqdm

    console.setup_logging()
    with tqdm(total=3, file=sys.stderr, disable=False, ascii=True) as bar:
        bar.update(1)
        logging.getLogger("megatron_rl.x").info("between bar updates")
        bar.update(1)
    err = capsys.readouterr().err
    # tqdm.write clears the bar first: the log line stands on its own line
    assert any(line.strip().startswith("[megatron-rl] ") and line.endswith("between bar updates")
               for line in re.split(r"[\r\n]", err)), repr(err)
