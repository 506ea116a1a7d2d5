"""What a run prints: the package's one logger, and the third-party warnings it silences.

Every module logs through a child of the `megatron_rl` logger (`logging.getLogger(__name__)`);
entry points (megatron_rl.train, `python -m megatron_rl.training.sft`, tools/bench_rollout.py)
call `setup_logging` once they know whether their rank logs. Its lines go to stderr through
`tqdm.write` (an active progress bar is redrawn below them, not torn), formatted

    [megatron-rl] 2026-11-29 08:05:24 INFO step 10: reward 0.412 entropy 0.8731 0.52s

so that the project's lines are told apart from anything a library prints. Ranks other than the
logging one print WARNING and above only.

`silence_third_party_warnings` is the one place where warnings of megatron-core and torch that the
user can do nothing about are dropped, each matched on its message and the module that raises it
(or the logger that logs it), with the reason. Any other warning still shows.
"""
import logging
import re
import sys
import warnings

import torch
from tqdm import tqdm

logger = logging.getLogger("megatron_rl")

FORMAT = "[megatron-rl] %(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# How a line of ours starts, for tests and scripts that pick them out of a console.
PREFIX = "[megatron-rl] "


class TqdmHandler(logging.Handler):
    """Writes records to stderr through tqdm.write, which clears any active bar first."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


_handler = None


def setup_logging(log_rank: bool = True) -> logging.Logger:
    """Send the package's log records to stderr in the project's format: INFO and above where
    `log_rank` (the rank that logs: the trainer's last pipeline stage, TP rank 0, DP rank 0),
    WARNING and above elsewhere. Called again (e.g. once the rank is known) it replaces its
    handler, so lines are never doubled. Records still propagate to the root logger, where
    pytest's caplog and any handler an embedding program installed find them."""
    global _handler
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = TqdmHandler()
    _handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO if log_rank else logging.WARNING)
    return logger


# (message regex, category, module regex) of warnings.warn calls in megatron-core and torch. The
# message must match from its start, the module (the one warnings attributes the call to) too.
SILENCED_WARNINGS = [
    # megatron-core's import-time notices that TransformerEngine / apex are missing and its torch
    # implementations (optimizers, multi-tensor ops, norms) are used instead: 4 at `import
    # megatron.core`, 2 more with the optimizer and the layer specs. On CPU neither package
    # exists; on a GPU host model.transformer_impl (auto: TE when installed) is where that choice
    # is made. They could go if megatron-core logged them at INFO.
    (r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back to ",
     UserWarning, r"megatron\.core\."),
    # TransformerConfig's own default (cuda_graph_modules="full") trips its deprecation of that
    # value in megatron-core 0.19.2; CUDA graphs are off here (cuda_graph_impl="none"). Goes when
    # megatron-core's default stops being a deprecated value.
    (r"full scope is deprecated\. Use empty cuda_graph_modules ", UserWarning,
     r"megatron\.core\.transformer\.transformer_config$"),
    # get_megatron_optimizer imports megatron.core.models.mimo, whose config class warns at
    # import that it is experimental; this project does not use MIMO models.
    (r"MimoModelConfig is experimental ", UserWarning, r"megatron\.core\.models\.mimo\."),
    # torch 2.13 deprecates all_gather_into_tensor, which megatron-core's tensor-parallel
    # mappings call (the project does not). Goes when megatron-core moves to all_gather_single.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. ",
     FutureWarning, r"torch\.distributed\.c10d_logger$"),
    # megatron's dist_checkpointing.load reads the common state and its own shards with
    # torch.distributed.checkpoint.load(..., no_dist=True) on purpose (megatron coordinates the
    # ranks), and tools/convert_checkpoint.py saves and loads with no_dist=True (one process by
    # design); torch warns on every such call that it assumes a single process, even when it is
    # told so. Nothing is wrong.
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
     r"(load|save) in a single process\.", UserWarning, r"torch\.distributed\.checkpoint\."),
    # megatron's dist_checkpointing passes the storage reader to torch.distributed.checkpoint.load
    # positionally, which torch's compatibility shim flags. megatron-core's call, not ours.
    (r"The argument order of load has been changed\. ", UserWarning,
     r"torch\.distributed\.checkpoint\."),
    # megatron's dist_checkpointing turns its sharded tensors into torch ShardedTensors to load
    # them, which torch deprecates in favour of DTensor. Goes when megatron-core moves to DTensor.
    (r"Please use DTensor instead and we are deprecating ShardedTensor\.", FutureWarning,
     r"torch\.distributed\.checkpoint\."),
]

# Silenced only on a host without CUDA, where they are moot; on a GPU they are advice to take.
SILENCED_WARNINGS_WITHOUT_CUDA = [
    # megatron's tensor-parallel linear layers (TP > 1) recommend CUDA_DEVICE_MAX_CONNECTIONS=1,
    # which orders CUDA streams so that the gradient all-reduce overlaps the backward; there are
    # no CUDA streams on CPU.
    (r"When using async grad allreduce it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS to 1 ", UserWarning,
     r"megatron\.core\.tensor_parallel\.layers$"),
]

# (logger name, message regex) of records megatron-core logs at WARNING through `logging`.
SILENCED_LOG_RECORDS = [
    # GPTModel.__init__ (rank 0) points at HybridModel; GPTModel is the model megatron-core
    # 0.19.2's checkpoints, layer specs and this project's conversion are built on. Goes with a
    # move to HybridModel.
    ("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED\. "),
    # The first dist_checkpointing.save of a process: megatron's synchronous save runs its own
    # async path with async_strategy="mcore" and then says that strategy is deprecated (NVRx is
    # not used here; saves are synchronous).
    ("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated "),
]


class MessageFilter(logging.Filter):
    """Drops a logger's records whose message matches `pattern` (from its start)."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def silence_third_party_warnings() -> None:
    """Install the filters of SILENCED_WARNINGS and SILENCED_LOG_RECORDS, and of
    SILENCED_WARNINGS_WITHOUT_CUDA on a host without CUDA (idempotent). Call it before
    megatron.core is imported: most of them are raised at import."""
    silenced = SILENCED_WARNINGS + ([] if torch.cuda.is_available()
                                    else SILENCED_WARNINGS_WITHOUT_CUDA)
    for message, category, module in silenced:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in SILENCED_LOG_RECORDS:
        target = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) and f.pattern.pattern == pattern
                   for f in target.filters):
            target.addFilter(MessageFilter(pattern))
