"""How the trainer's weights reach running SGLang servers: the requests and tensors of one sync.

weight_sync.py says what the weights are (HF-named full tensors gathered from the megatron model,
HF folders); this module moves them, by one of three methods (rollout.sglang.weight_sync), each
between /begin_weight_update and /end_weight_update:
  - distributed: one process group per engine (the trainer's rank 0 plus the engine's TP ranks;
    NCCL on GPU, gloo on CPU); each bucket is one flat byte tensor broadcast from the trainer;
  - tensor: tensors shared in memory (CUDA IPC on GPU, torch's file_system strategy on CPU),
    handles pickled into the request, for engines on the trainer's own host;
  - disk: the trainer writes an HF folder, the engines load it.
The sync's last request sets the weight version and flushes the radix cache. Which engines take
part, what a failed one means and the version bookkeeping are the client's (sglang_client.py):
it hands WeightSender its HTTP call and a loop over the engines that sets failed ones aside.
"""
import base64
import io
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_rl.errors import EngineError
from megatron_rl.ports import free_port
from megatron_rl.rollout.config import SGLangConfig
from megatron_rl.rollout.sglang_server import SGLangServer
from megatron_rl.rollout.weight_sync import write_hf_folder

NamedTensors = Iterable[Tuple[str, torch.Tensor]]
# post(engine index, route, payload=None) -> the reply's JSON
Post = Callable[..., dict]
# on_each(action): action(index) for every engine of the sync that has not failed yet
OnEach = Callable[[Callable[[int], object]], None]


def buckets(named_tensors: NamedTensors,
            bucket_bytes: int) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most bucket_bytes (a larger tensor travels alone), one dtype
    per group so a bucket is one flat tensor on both sides."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > bucket_bytes or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _with_last(items: Iterable) -> Iterator[Tuple[object, bool]]:
    """(item, is_last) for each item, looking one ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def flatten_bucket(bucket: List[Tuple[str, torch.Tensor]],
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The bytes of each tensor back to back: the layout SGLang's "flattened_bucket" load format
    unpacks from names, dtypes and shapes. Written into `out` (a uint8 buffer, reused between
    buckets) when it is large enough: on CPU, fresh memory costs page faults that take longer
    than the copy itself."""
    nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
    if out is None or out.numel() < nbytes or out.device != bucket[0][1].device:
        out = torch.empty(nbytes, dtype=torch.uint8, device=bucket[0][1].device)
    flat, offset = out[:nbytes], 0
    for _, tensor in bucket:  # one dtype per bucket, so every offset is aligned for it
        size = tensor.numel() * tensor.element_size()
        flat[offset: offset + size].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        offset += size
    return flat


def weight_sync_group(master_port: int, world_size: int, backend: str, group_name: str,
                      timeout_s: float) -> Tuple[dist.ProcessGroup, dist.TCPStore]:
    """A process group outside the job's world: this process is rank 0 and hosts the store, the
    engine's TP ranks join as 1..world_size-1 (SGLang's /init_weights_update_group). torch has no
    public call for a second group with its own rendezvous, hence the c10d helper."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                    _world)

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(sync_master_address(), master_port, world_size, is_master=True,
                          timeout=timeout)
    group, _ = _new_process_group_helper(world_size, 0, [], Backend(backend),
                                         PrefixStore(group_name, store), group_name=group_name,
                                         timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group, store  # the caller keeps the store as long as the group


def sync_master_address() -> str:
    """The trainer's address as the engines see it: torchrun's MASTER_ADDR, loopback when run
    plainly."""
    return os.environ.get("MASTER_ADDR", "127.0.0.1")


def _share_for_http(named: List[Tuple[str, torch.Tensor]]) -> str:
    """Pickle tensors as shared-memory handles (what SGLang's MultiprocessingSerializer reads):
    CUDA IPC handles on GPU; on CPU torch's file_system strategy, because the default passes file
    descriptors over a socket, which an HTTP body cannot carry. Sharing a CPU tensor moves its
    storage into shared memory, so CPU tensors (which may be live parameters) are copied first."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as mp

    if mp.get_sharing_strategy() != "file_system" and not named[0][1].is_cuda:
        mp.set_sharing_strategy("file_system")
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([
        (name, t.detach().contiguous() if t.is_cuda else t.detach().clone()) for name, t in named])
    return base64.b64encode(buffer.getvalue()).decode()


_GROUP_NUMBERS = itertools.count()


class WeightSender:
    """The trainer's end of weight sync to a client's servers: keeps each engine's
    weight-sync group (made on its first distributed sync, dropped when it restarts) and a
    reused CPU buffer for packing buckets."""

    def __init__(self, cfg: SGLangConfig, servers: List[SGLangServer], post: Post):
        self.cfg, self.servers, self._post = cfg, servers, post
        # engine index -> (its weight-sync group, the group's name, the store it rendezvoused on)
        self._groups: Dict[int, Tuple[dist.ProcessGroup, str, dist.TCPStore]] = {}
        self._flat: Optional[torch.Tensor] = None  # reused bucket buffer (CPU)

    def send(self, named_tensors: NamedTensors, version: int, method: str, on_each: OnEach,
             disk_dir: Optional[str]) -> Tuple[int, int]:
        """Load the tensors (HF names, full tensors; read once, bucket by bucket, each bucket
        going to every engine on_each visits) and set the engines' weight version. Returns
        (bytes sent, buckets; 0 for disk)."""
        # The last request of a sync also sets the version and flushes the radix cache (its KV
        # came from the old weights), without torch_empty_cache: a separate /flush_cache would
        # also empty the allocator, which on CPU is a gc.collect() of 0.5-1.5 s per sync.
        last = {"flush_cache": True, "weight_version": str(version), "torch_empty_cache": False}
        sent, count = 0, 0
        if method == "disk":
            sent = self._write_for_disk(named_tensors, disk_dir)
            on_each(lambda i: self._post(i, "/update_weights_from_disk",
                                         {"model_path": disk_dir, **last}))
            return sent, count
        on_each(lambda i: self._post(i, "/begin_weight_update"))
        replies = []  # waits for each bucket's replies: a server answers once it has loaded
        # two request threads per server: the next bucket's request can go out while the
        # previous one still waits for its reply
        with ThreadPoolExecutor(2 * len(self.servers)) as pool:
            for bucket, is_last in _with_last(buckets(named_tensors,
                                                      int(self.cfg.bucket_mb * 2**20))):
                sent += sum(t.numel() * t.element_size() for _, t in bucket)
                count += 1
                finish = last if is_last else {"flush_cache": False}
                if method == "distributed":
                    replies.append(self._send_distributed(on_each, pool, bucket, finish))
                else:
                    payload = [_share_for_http(bucket)] * self.cfg.tp_size
                    on_each(lambda i: self._post(i, "/update_weights_from_tensor", {
                        "serialized_named_tensors": payload, **finish}))
            for wait in replies:
                wait()
        on_each(lambda i: self._post(i, "/end_weight_update"))
        return sent, count

    def drop_group(self, index: int) -> None:
        """Engine `index` is restarting: its group goes with it (the next sync makes a new one)."""
        entry = self._groups.pop(index, None)
        if entry is not None:
            dist.destroy_process_group(entry[0])

    def close(self) -> None:
        for group, _, _ in self._groups.values():
            dist.destroy_process_group(group)
        self._groups.clear()

    def _group(self, index: int) -> Tuple[dist.ProcessGroup, str]:
        if index not in self._groups:
            # A name no group of this process had before: torch refuses a name twice, and a
            # restarted engine, or another client in the same process, needs a group of its own.
            port = free_port()
            name = f"megatron_rl_weight_sync_{index}_{next(_GROUP_NUMBERS)}"
            backend = "gloo" if self.servers[index].device == "cpu" else "nccl"
            world = 1 + self.cfg.tp_size
            # The server's call returns only once this process has joined the group too.
            with ThreadPoolExecutor(1) as pool:
                joined = pool.submit(self._post, index, "/init_weights_update_group", {
                    "master_address": sync_master_address(), "master_port": port,
                    "rank_offset": 1, "world_size": world, "group_name": name,
                    "backend": backend})
                group, store = weight_sync_group(port, world, backend, name,
                                                 self.cfg.request_timeout_s)
                reply = joined.result()
            if not reply.get("success", True):
                raise EngineError(f"engine {index} could not join the weight-sync group: {reply}")
            self._groups[index] = (group, name, store)
        return self._groups[index][:2]

    def _flatten(self, bucket: List[Tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The bucket as one flat tensor on the engines' device; a CPU buffer is kept for the
        next bucket (GPU memory is left to the caching allocator, and to training)."""
        flat = flatten_bucket(bucket, self._flat)
        if flat.device.type == "cpu":
            self._flat = flat._base  # flatten_bucket returns a slice of its buffer
        return flat if self.servers[0].device == "cpu" else flat.cuda()

    def _send_distributed(self, on_each: OnEach, pool: ThreadPoolExecutor,
                          bucket: List[Tuple[str, torch.Tensor]],
                          finish: dict) -> Callable[[], None]:
        """One bucket to every engine: the request first, so that each server allocates its
        receive buffer (fresh memory, page faults on CPU) while this process packs the bucket,
        then the broadcast over the engine's group. Returns the wait for the replies: the
        servers load the bucket while the caller packs and sends the next one (a server takes
        requests in order; the next request waits for the previous load)."""
        request = {"names": [n for n, _ in bucket],
                   "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
                   "shapes": [list(t.shape) for _, t in bucket],
                   "load_format": "flattened_bucket", **finish}
        replies = {}
        on_each(lambda i: replies.__setitem__(i, pool.submit(
            self._post, i, "/update_weights_from_distributed",
            {**request, "group_name": self._group(i)[1]})))
        flat = self._flatten(bucket)
        on_each(lambda i: dist.broadcast(flat, group=self._group(i)[0], group_src=0))
        return lambda: on_each(lambda i: replies[i].result())

    def _write_for_disk(self, named_tensors: NamedTensors, disk_dir: Optional[str]) -> int:
        if disk_dir is None:
            raise ValueError("weight sync from disk needs a folder (disk_dir)")
        return write_hf_folder(named_tensors, disk_dir, files_from=self.servers[0].model_path)
