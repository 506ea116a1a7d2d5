"""Rank 1 stops answering (sleeps); rank 0's next all-reduce must fail after
parallel.timeout_minutes instead of hanging. Prints the seconds rank 0 waited."""
import sys
import time

import torch
import torch.distributed as dist

from megatron_rl.parallel.config import ParallelConfig
from megatron_rl.parallel.state import initialize

timeout_minutes = float(sys.argv[1])
initialize(ParallelConfig(timeout_minutes=timeout_minutes))
dist.all_reduce(torch.ones(1))  # both ranks are healthy here
if dist.get_rank() == 1:
    time.sleep(120)  # stuck: never joins the next collective
    sys.exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
    print("STUCK_RESULT completed", flush=True)
except Exception as e:  # gloo raises on timeout
    print(f"STUCK_RESULT failed_after {time.monotonic() - t0:.1f} {type(e).__name__}", flush=True)
sys.exit(3)
