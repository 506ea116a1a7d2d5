"""Score a checkpoint on the config's evaluation sets, without training it:

    python -m megatron_rl.evaluate --config X.yaml --checkpoint DIR [--out FILE] [key=value ...]
    python -m megatron_rl.evaluate --config X.yaml --hf HF_DIR [--out FILE] [key=value ...]
    torchrun --nproc_per_node 2 -m megatron_rl.evaluate ... parallel.tensor_model_parallel_size=2

--checkpoint: a megatron checkpoint of any TP/PP layout, loaded into the config's layout: a
training checkpoint (checkpoints/step_N, its digests checked first; a run's checkpoints/ folder
means the one `latest` names) or a model checkpoint of tools/convert_checkpoint.py
hf-to-megatron. --hf: a Hugging Face folder, its weights put into the model in memory
(checkpointing/convert.py load_hf_weights). The sets are the config's data.eval_sets, or the
built-in task's held-out set (the dataset task's draw of data.eval_prompts) as the trainer
evaluates it; the model, the layout, the rollout engine (rollout.engine: built-in or SGLang) and
the verifiers are the config's too. The evaluation is the trainer's (analysis/validation.py
run_evaluation), with the sampling seeds of the checkpoint's step: a training checkpoint scores
what the run logged at that step, in the same layout. Prints one row per set and writes eval.json
(default: in the checkpoint's or HF folder; --out FILE otherwise): each set's settings,
accuracy (avg@k), pass@k, mean response tokens, truncated fraction and the counts behind them,
and the metrics record the trainer would log. Config, data and conversion errors exit 2 naming
the key, file and row; a checkpoint that fails verification exits 1.
"""
import argparse
import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Tuple


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_rl.evaluate",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML job config (its model, layout, "
                                                        "data.eval_sets, rollout, reward)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="megatron checkpoint folder (training or model "
                                             "checkpoint, any layout)")
    source.add_argument("--hf", help="Hugging Face model folder (safetensors)")
    parser.add_argument("--out", help="where eval.json goes (default: SOURCE/eval.json)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_intermixed_args(argv)


def resolve_checkpoint(path: str) -> Tuple[str, int]:
    """(checkpoint folder, its step): a folder holding checkpoints and `latest` (a run's
    checkpoints/) stands for the checkpoint `latest` names; the step is train_state.json's, 0
    for a model checkpoint. FileNotFoundError for a folder that holds no checkpoint."""
    from megatron_rl.checkpointing.checkpoint import (STATE_FILE, checkpoint_steps,
                                                      latest_checkpoint)

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    if not os.path.exists(os.path.join(path, ".metadata")) and checkpoint_steps(path):
        path = latest_checkpoint(path)
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"--checkpoint {path}: not a megatron distributed checkpoint "
                                f"(no .metadata), nor a folder of checkpoints")
    state = os.path.join(path, STATE_FILE)
    step = 0
    if os.path.exists(state):
        try:
            with open(state) as f:
                step = int(json.load(f)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = 0  # load_model's digest check names what is wrong with it
    return path, step


def evaluate_model(cfg, task, source: str, hf: bool, step: int, engine_dir: str):
    """Build the config's model in its layout, load `source` into it, evaluate every set with
    the config's engine. Collective: every rank. Returns (per-set results, metrics record,
    reward faults, this process's global rank)."""
    import torch
    import torch.distributed as dist

    from megatron_rl.analysis.validation import build_eval_sets, eval_seed, run_evaluation
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.rewards.scoring import Scorers
    from megatron_rl.rollout.factory import build_rollout_engine

    owns_group = not dist.is_initialized()  # a caller's process group stays the caller's
    info = state.initialize(cfg.parallel)  # also patches megatron-core on CPU hosts: first
    from megatron.core import parallel_state as mpu

    scorers = Scorers(cfg.reward, task.score)
    faults = scorers.faults
    engine = None
    try:
        model = build_gpt_model(cfg.model, cfg.parallel)
        if hf:
            from megatron_rl.checkpointing.convert import load_hf_weights

            load_hf_weights(model, source, cfg.model)
        else:
            from megatron_rl.checkpointing.model import load_model
            from megatron_rl.errors import CheckpointError

            try:
                load_model(model, source)
            except CheckpointError:
                raise
            except Exception as e:  # e.g. a checkpoint of another model than the config's
                raise CheckpointError(f"{source} does not load into the model of the config "
                                      f"({type(e).__name__}: {e})") from e

        sets = build_eval_sets(cfg, task, scorers, info.dp_rank, info.dp_size)
        engine = build_rollout_engine(cfg, model, engine_dir, step, device=info.device.type,
                                      vocab_size=task.vocab_size)
        results, record = run_evaluation(
            engine, sets, task.decode, stop_token_ids=(task.eos_id,),
            seed=eval_seed(cfg.rollout.seed, step, info.dp_rank),
            dp_group=mpu.get_data_parallel_group(), law_metric=cfg.training.law_metric)
        # each data-parallel replica scored its own samples (its TP/PP peers the same ones)
        names = sorted(faults)
        counts = torch.tensor([float(faults[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(counts, group=mpu.get_data_parallel_group())
        return results, record, dict(zip(names, map(int, counts.tolist()))), info.rank
    finally:
        if engine is not None:
            engine.shutdown()
        scorers.close()
        if owns_group:
            state.destroy()
        else:
            mpu.destroy_model_parallel()


def table(results) -> str:
    """One row per set: prompts, k, temperature, accuracy, pass@k, response tokens, truncated."""
    header = ("set", "prompts", "k", "temperature", "accuracy", "pass@k", "response_tokens",
              "truncated")
    rows = [(r.spec.name, str(r.prompts), str(r.spec.samples), f"{r.spec.temperature:g}",
             f"{r.accuracy:.4f}", f"{r.pass_at_k:.4f}", f"{r.response_tokens:.1f}",
             f"{r.truncated:.4f}") for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [header] + rows)


def report(args, source: str, step: int, results, record, faults, skipped) -> Dict:
    """eval.json's content."""
    sets = {}
    for r in results:
        sets[r.spec.name] = dict(r.summary(), **({"skipped_rows": skipped[r.spec.name]}
                                                 if skipped.get(r.spec.name) else {}))
    out = {"source": os.path.abspath(source), "kind": "hf" if args.hf else "megatron",
           "step": step, "config": os.path.abspath(args.config), "overrides": args.overrides,
           "sets": sets, "metrics": record, "reward_faults": faults}
    if "eval/mean/accuracy" in record:
        out["mean_accuracy"] = record["eval/mean/accuracy"]
    return out


def write_json(path: str, data: Dict) -> None:
    from megatron_rl.files import replace_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    replace_file(os.path.abspath(path), write)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_rl.console import setup_logging, silence_third_party_warnings

    silence_third_party_warnings()  # before megatron.core is imported: most warn at import
    setup_logging(log_rank=int(os.environ.get("RANK", "0")) == 0)
    from megatron_rl.config import load_job_config
    from megatron_rl.errors import CheckpointError
    from megatron_rl.models.hf_mapping import ConversionError

    cfg = load_job_config(args.config, args.overrides)  # every config error, named, here
    if cfg is None:
        return 2
    try:
        if args.hf:
            if not os.path.isdir(args.hf):
                raise FileNotFoundError(f"--hf {args.hf}: no such folder")
            source, step = args.hf, 0
        else:
            source, step = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(source, "eval.json")
    engine_dir = os.path.splitext(os.path.abspath(out))[0] + "_engine"  # SGLang's weights, logs
    from megatron_rl.data.prompts import DataError
    from megatron_rl.data.task import build_task

    try:  # the prompt files, before any process group: a bad row ends every rank here
        task = build_task(cfg, training_prompts=False)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    try:
        results, record, faults, rank = evaluate_model(cfg, task, source, bool(args.hf), step,
                                                       engine_dir)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        skipped = {s.name: s.skipped for s in task.eval_sets}
        write_json(out, report(args, source, step, results, record, faults, skipped))
        print(table(results))
        if "eval/mean/accuracy" in record:
            print(f"weighted mean accuracy {record['eval/mean/accuracy']:.4f}")
        from megatron_rl.analysis.validation import law_source

        source_key = law_source([r.spec for r in results], cfg.training.law_metric)
        print(f"eval_accuracy {record['eval_accuracy']:.4f} (the law metric"
              f"{'' if source_key == 'eval_accuracy' else ': ' + source_key})")
        print(f"wrote {out}")
        shutil.rmtree(engine_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
