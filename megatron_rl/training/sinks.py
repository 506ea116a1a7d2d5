"""Where every metrics record of a run goes, on the logging rank: RUN_DIR/metrics.jsonl always
(what the plots, the comparison tool and the regression check read), TensorBoard when
training.tensorboard is set, wandb when training.wandb_project is."""
import json
import os
from typing import Callable, Dict, List


def _scalars(record: Dict) -> Dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


class MetricSinks:
    def __init__(self, cfg, out_dir: str):
        self._file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self._writers: List[Callable[[Dict], None]] = []
        self._closers: List[Callable[[], None]] = [self._file.close]
        if cfg.training.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

            def to_tensorboard(record):
                for key, value in _scalars(record).items():
                    writer.add_scalar(key, value, record["step"])
                writer.flush()

            self._writers.append(to_tensorboard)
            self._closers.append(writer.close)
        if cfg.training.wandb_project:
            try:
                import wandb
            except ImportError as e:
                self.close()
                raise SystemExit("training.wandb_project is set but wandb is not installed") from e
            from megatron_rl.config import to_dict

            run = wandb.init(project=cfg.training.wandb_project, config=to_dict(cfg), dir=out_dir)
            self._writers.append(lambda record: run.log(_scalars(record), step=record["step"]))
            self._closers.append(run.finish)

    def write(self, record: Dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for write in self._writers:
            write(record)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers = []
