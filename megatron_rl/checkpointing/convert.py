"""Hugging Face folder <-> megatron distributed checkpoint, one tensor at a time.

hf-to-megatron needs no model and no ranks: megatron's GPTModel, built on the meta device, says
which tensors and objects its dist_checkpointing stores (keys, global shapes, dtypes), and
torch.distributed.checkpoint writes them with a planner that makes each layer's block of each
tensor from HF tensors (the mapping is megatron_rl.models.hf_mapping) only when the writer asks
for it; peak memory is about the largest single tensor. The checkpoint stores global tensors, so
it loads into any layout whose padded vocabulary matches, through megatron's own loader.

megatron-to-hf needs no model and no layout: it reads one layer's slice of one stored tensor at a
time (torch.distributed.checkpoint with a block-reading planner), maps it to HF tensors, and
streams them into safetensors files whose headers are planned up front from the checkpoint
metadata; peak memory is about the largest single tensor.

MEGATRON_DIR also holds model_config.yaml (the ModelConfig) and hf_files/ (config.json, tokenizer
and every other non-weight file of the source folder), so megatron-to-hf needs only --input.

load_hf_weights puts an HF folder's weights straight into a built model of any TP/PP layout,
with no checkpoint written (`python -m megatron_rl.evaluate --hf`).
"""
import dataclasses
import json
import os
import shutil
import struct
from typing import Dict, List, Optional, Tuple

import torch
import yaml

from megatron_rl.checkpointing.model import verify_checkpoint_metadata
from megatron_rl.models.config import ModelConfig
from megatron_rl.models.hf_mapping import (
    ConversionError, expected_hf_shapes, hf_config_from_model_config, hf_names,
    megatron_tensor_from_hf, megatron_to_hf_tensors, model_config_from_hf)

MODEL_CONFIG_FILE = "model_config.yaml"
HF_FILES_DIR = "hf_files"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
_WEIGHT_FILES = {SAFETENSORS_INDEX, "pytorch_model.bin.index.json"}
# HF stores these when present, but they are recomputed from the config.
_IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# The Hugging Face side


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found (an HF model folder needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


class HFSafetensorsReader:
    """Tensors of an HF folder by name. Each tensor is read through its own short-lived mapping
    of its shard: a shard kept open keeps every page read from it resident, which would bring
    back the whole model's worth of memory over an import."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.file_of: Dict[str, str] = json.load(f)["weight_map"]
            missing = sorted({f for f in self.file_of.values()
                              if not os.path.exists(os.path.join(hf_dir, f))})
            if missing:
                raise ConversionError(f"{index_path}: lists shard files that are missing: "
                                      f"{', '.join(missing)}")
            files = sorted(set(self.file_of.values()))
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not files:
                raise ConversionError(f"{hf_dir}: no *.safetensors files (only safetensors "
                                      f"checkpoints are supported)")
            self.file_of = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        for file in files:
            with safe_open(os.path.join(hf_dir, file), framework="pt") as handle:
                for name in handle.keys():
                    self.file_of.setdefault(name, file)
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.file_of:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is in no safetensors shard")
        with safe_open(os.path.join(self.hf_dir, self.file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def check_against(self, cfg: ModelConfig) -> None:
        """Refuse missing, unexpected or misshapen tensors before any model is built."""
        expected = expected_hf_shapes(cfg)
        missing = sorted(set(expected) - set(self.file_of))
        if missing:
            raise ConversionError(f"{self.hf_dir}: tensors missing from the safetensors shards: "
                                  f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unexpected = sorted(n for n in set(self.file_of) - set(expected) - allowed_extra
                            if not n.endswith(_IGNORED_HF_TENSORS))
        if unexpected:
            raise ConversionError(f"{self.hf_dir}: tensors the model config has no place for: "
                                  f"{', '.join(unexpected[:8])}"
                                  f"{' ...' if len(unexpected) > 8 else ''}")
        for name, shape in expected.items():
            if self.shapes.get(name) != shape:
                raise ConversionError(f"{self.hf_dir}/{self.file_of[name]}: {name} has shape "
                                      f"{self.shapes.get(name)}, the config implies {shape}")


def _copy_non_weight_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if os.path.isfile(path) and entry not in _WEIGHT_FILES and not entry.endswith(
                _WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(dst, entry))


def _require_empty_output(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"output {path} exists and is not an empty directory")


# ---------------------------------------------------------------------------------------------
# The megatron side: stored tensors and their blocks

_LAYERS = "decoder.layers."


def _blocks(stored_shapes: Dict[str, Tuple[int, ...]],
            num_layers: int) -> List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]]:
    """(megatron name, stored key, offsets, block shape) in file order: embedding, layer by
    layer, then final norm and output layer. Megatron stores each `decoder.layers.*` tensor
    stacked over the layers (leading axis); its block is one layer's slice, named with the
    layer index (decoder.layers.<i>.<suffix>), and the other tensors are one block each."""
    def whole(key):
        return key, key, (0,) * len(stored_shapes[key]), tuple(stored_shapes[key])

    layer_keys = [k for k in stored_shapes if k.startswith(_LAYERS)]
    others = [k for k in stored_shapes if k not in layer_keys]
    first = [k for k in others if k.startswith("embedding.")]
    out = [whole(k) for k in first]
    for layer in range(num_layers):
        for key in layer_keys:
            size = tuple(stored_shapes[key])
            out.append((f"{_LAYERS}{layer}.{key[len(_LAYERS):]}", key,
                        (layer,) + (0,) * (len(size) - 1), (1,) + size[1:]))
    return out + [whole(k) for k in others if k not in first]


# ---------------------------------------------------------------------------------------------
# hf-to-megatron


def prepare_import(hf_dir: str, out_dir: str, tp: int, pp: int,
                   make_vocab_size_divisible_by: int = 128,
                   dtype: Optional[str] = None) -> Tuple[ModelConfig, HFSafetensorsReader]:
    """Every check that needs no process group: config, layout, shard files, tensor shapes."""
    from megatron_rl.config import ConfigError, JobConfig
    from megatron_rl.parallel.config import ParallelConfig

    cfg = model_config_from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"),
                               make_vocab_size_divisible_by, dtype)
    try:
        JobConfig(model=cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                     pipeline_model_parallel_size=pp)
                  ).validate(world_size=tp * pp)
    except (ConfigError, ValueError) as e:
        raise ConversionError(f"layout --tp {tp} --pp {pp} does not fit "
                              f"{os.path.join(hf_dir, 'config.json')}: {e}") from None
    reader = HFSafetensorsReader(hf_dir)
    reader.check_against(cfg)
    _require_empty_output(out_dir)
    return cfg, reader


def _stored_entries(cfg: ModelConfig, tp: int):
    """What megatron's dist_checkpointing stores for this model, asked of megatron itself: the
    GPTModel is built on the meta device (no memory) in this one process with TP=1 and PP=1, and
    its sharded state dict gives ({tensor key: (global shape, dtype)}, {object key: object}).
    Global tensors do not depend on the layout, except the vocabulary rows, padded for TP=tp as
    megatron pads them (to a multiple of make_vocab_size_divisible_by x tp)."""
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.parallel.config import ParallelConfig

    single = ParallelConfig()
    state.initialize(single)  # also patches megatron-core for CPU hosts before it is imported
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                          apply_factories)
    try:
        # The stored keys are the same whichever layer spec builds the model; the local one
        # needs no TE. Padding to a multiple of (divisor x tp) at TP=1 is padding for TP=tp.
        padded = dataclasses.replace(
            cfg, transformer_impl="local",
            make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)
        with torch.device("meta"):
            sharded = build_gpt_model(padded, single).sharded_state_dict()
        apply_factories(sharded)  # e.g. SwiGLU's fc1, stored as [gate; up]
    finally:
        state.destroy()
    tensors, objects = {}, {}
    for entry in nested_values(sharded):
        if isinstance(entry, ShardedTensor):
            tensors[entry.key] = (tuple(entry.global_shape), entry.dtype)
        elif isinstance(entry, ShardedObject):
            objects[entry.unique_key] = entry.data
    # what megatron's save adds beside the model: its common (non-sharded) state, empty here
    objects[ShardedObject("common_state", None, (1,), (0,)).unique_key] = {}
    return tensors, objects


def _import_blocks(cfg: ModelConfig, stored_shapes: Dict[str, Tuple[int, ...]]):
    """The blocks of _blocks, each one's mapping from HF tried on meta tensors, so that a name or
    shape the mapping does not give stops the import before anything is written. A vocabulary
    tensor (more rows stored than HF has: megatron's padding for TP) becomes two blocks, HF's
    rows and the padding rows (name None, zeros), so that it is written as read, never copied."""
    hf_shapes = expected_hf_shapes(cfg)

    def meta(hf_name):
        return torch.empty(hf_shapes[hf_name], device="meta")

    out = []
    for name, key, offsets, shape in _blocks(stored_shapes, cfg.num_layers):
        mapped = tuple(megatron_tensor_from_hf(name, meta, cfg).shape)
        layer = name.startswith(_LAYERS)
        one = shape[1:] if layer else shape  # a layer's slice or the whole tensor
        if mapped == one:
            out.append((name, key, offsets, shape))
        elif not layer and mapped[1:] == shape[1:] and mapped[0] < shape[0]:
            out.append((name, key, offsets, mapped))
            out.append((None, key, (mapped[0],) + offsets[1:],
                        (shape[0] - mapped[0],) + shape[1:]))
        else:
            raise ConversionError(f"{name}: the HF tensors map to shape {mapped}, megatron "
                                  f"stores {one}")
    return out


def _lazy_save_planner():
    import io

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties)
    from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                      WriteItemType)

    class LazySavePlanner(DefaultSavePlanner):
        """Plans the checkpoint from shapes alone and makes each block only when the storage
        writer asks for it (resolve_data), one at a time: the mirror of the export's
        BlockLoadPlanner. Objects are stored as megatron stores a ShardedObject."""

        def __init__(self, tensors, blocks, objects, make_block):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.tensors, self.objects, self.make_block = tensors, objects, make_block
            self.block_of = {MetadataIndex(block[1], torch.Size(block[2])): block
                             for block in blocks}

        def create_local_plan(self):
            items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)
                     for key in self.objects]
            for index, (_, _, _, shape) in self.block_of.items():
                size, dtype = self.tensors[index.fqn]
                chunk = ChunkStorageMetadata(offsets=index.offset, sizes=torch.Size(shape))
                items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(
                                           chunk=chunk, properties=TensorProperties(dtype=dtype),
                                           size=torch.Size(size))))
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                data = io.BytesIO()
                torch.save([self.objects[write_item.index.fqn]], data)
                return data
            return self.make_block(self.block_of[write_item.index],
                                   self.tensors[write_item.index.fqn][1])

    return LazySavePlanner


def import_hf_checkpoint(hf_dir: str, out_dir: str, tp: int, pp: int,
                         make_vocab_size_divisible_by: int = 128,
                         dtype: Optional[str] = None) -> ModelConfig:
    """Write a megatron dist checkpoint of the HF model in HF_DIR, in this one process, one
    block at a time. tp decides the vocabulary padding; tp and pp are checked to split the
    model (prepare_import) but need no processes: the stored tensors are global."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("hf-to-megatron runs in one process whatever --tp/--pp (the "
                              "checkpoint holds global tensors); run it without torchrun")
    cfg, reader = prepare_import(hf_dir, out_dir, tp, pp, make_vocab_size_divisible_by, dtype)
    tensors, objects = _stored_entries(cfg, tp)
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    blocks = _import_blocks(cfg, {key: shape for key, (shape, _) in tensors.items()})

    def make_block(block, stored_dtype):
        name, _, _, shape = block
        if name is None:  # vocabulary padding rows
            return torch.zeros(shape, dtype=stored_dtype)
        return megatron_tensor_from_hf(name, reader.get, cfg).to(stored_dtype).reshape(shape)

    os.makedirs(out_dir, exist_ok=True)
    # One file per block: torch's FileSystemWriter keeps the last block of each key of a file
    # (for its safetensors format, whatever the format) until it closes the file, which in one
    # file would keep both vocabulary tensors and a whole layer in memory.
    writer = FileSystemWriter(out_dir, single_file_per_rank=False, thread_count=1)
    save({}, storage_writer=writer,
         planner=_lazy_save_planner()(tensors, blocks, objects, make_block), no_dist=True)
    # last, as megatron's save does: metadata.json marks a complete dist checkpoint
    save_config(CheckpointingConfig("torch_dist"), out_dir)
    with open(os.path.join(out_dir, MODEL_CONFIG_FILE), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    _copy_non_weight_files(hf_dir, os.path.join(out_dir, HF_FILES_DIR))
    return cfg


# ---------------------------------------------------------------------------------------------
# megatron-to-hf


def read_model_config(path: str) -> ModelConfig:
    """ModelConfig from MEGATRON_DIR/model_config.yaml, a file of that form, or a job config
    YAML (its `model:` section)."""
    from megatron_rl.config import ConfigError, from_dict, yaml_load

    if os.path.isdir(path):
        path = os.path.join(path, MODEL_CONFIG_FILE)
    try:
        with open(path) as f:
            data = yaml_load(f) or {}
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found; pass --model-config with the job's config "
                              f"YAML for checkpoints not written by hf-to-megatron") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    try:
        return from_dict(ModelConfig, data, "model")
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None


def _block_load_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class BlockLoadPlanner(DefaultLoadPlanner):
        """Reads the block of stored global tensor `key` at `offsets` into `buffer`; megatron
        stores each layer of `decoder.layers.*` as a slice along a leading layer axis."""

        def __init__(self, key: str, buffer: torch.Tensor, offsets: Tuple[int, ...]):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.key, self.buffer, self.offsets = key, buffer, offsets

        def create_local_plan(self):
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.buffer.shape)
            return LoadPlan(create_read_items_for_chunk_list(
                self.key, self.metadata.state_dict_metadata[self.key], [chunk]))

        def resolve_tensor(self, read_item):
            block = self.buffer  # dest_offsets are relative to the requested block
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                block = block.narrow(dim, start, length)
            return block

        def commit_tensor(self, read_item, tensor):
            pass  # resolve_tensor handed out views of the buffer

    return BlockLoadPlanner


class MegatronCheckpointReader:
    """The stored model tensors of a megatron dist checkpoint, one layer block at a time, under
    their per-layer megatron names (decoder.layers.<i>.<suffix>)."""

    def __init__(self, checkpoint_dir: str, cfg: ModelConfig):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if not os.path.exists(os.path.join(checkpoint_dir, ".metadata")):
            raise ConversionError(f"{checkpoint_dir}: not a megatron torch_dist checkpoint "
                                  f"(no .metadata file)")
        self.checkpoint_dir = checkpoint_dir
        verify_checkpoint_metadata(checkpoint_dir)
        self._reader = FileSystemReader(checkpoint_dir)
        stored = self._reader.read_metadata().state_dict_metadata
        self.stored = {k: v for k, v in stored.items() if isinstance(v, TensorStorageMetadata)
                       and k.split(".")[0] in ("embedding", "decoder", "output_layer")}
        for key, meta in self.stored.items():
            if key.startswith(_LAYERS) and meta.size[0] != cfg.num_layers:
                raise ConversionError(f"{checkpoint_dir}: {key} stores {meta.size[0]} layers, "
                                      f"model.num_layers={cfg.num_layers}")
        self.layer_keys = [k for k in self.stored if k.startswith(_LAYERS)]
        self.num_layers = cfg.num_layers

    def blocks(self) -> List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]]:
        return _blocks({k: tuple(m.size) for k, m in self.stored.items()}, self.num_layers)

    def dtype(self, key: str) -> torch.dtype:
        return self.stored[key].properties.dtype

    def load(self, key: str, offsets: Tuple[int, ...], shape: Tuple[int, ...]) -> torch.Tensor:
        from torch.distributed.checkpoint import load

        buffer = torch.empty(shape, dtype=self.dtype(key))
        load({key: buffer}, storage_reader=self._reader,
             planner=_block_load_planner()(key, buffer, offsets), no_dist=True)
        return buffer[0] if key in self.layer_keys else buffer


def _safetensors_header(entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _plan_shards(reader: MegatronCheckpointReader, cfg: ModelConfig, dtype: Optional[torch.dtype],
                 max_shard_bytes: int):
    """Group blocks into files of at most max_shard_bytes (a block's HF tensors stay together),
    with each block's HF (name, dtype, shape) worked out on meta tensors."""
    shards, current, current_bytes = [], [], 0
    for block in reader.blocks():
        name, key, _, shape = block
        meta = torch.empty(shape[1:] if key in reader.layer_keys else shape, device="meta",
                           dtype=dtype or reader.dtype(key))
        outputs = [(n, t.dtype, tuple(t.shape)) for n, t in megatron_to_hf_tensors(name, meta, cfg)]
        if not outputs:  # the tied output layer: HF has no copy of it
            continue
        nbytes = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                     for _, d, s in outputs)
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((block, outputs))
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def _write_hf_config(reader_dir: str, out_dir: str, cfg: ModelConfig,
                     dtype: Optional[str]) -> None:
    """The source folder's config.json, tokenizer and other files as they were; config.json made
    from the ModelConfig when there is no source folder, its dtype updated when tensors were
    cast."""
    hf_files = os.path.join(reader_dir, HF_FILES_DIR)
    if os.path.isdir(hf_files):
        _copy_non_weight_files(hf_files, out_dir)
    config_path = os.path.join(out_dir, "config.json")
    if os.path.exists(config_path) and dtype is None:
        return
    config = read_hf_config(out_dir) if os.path.exists(config_path) else (
        hf_config_from_model_config(cfg))
    if dtype is not None:
        config.pop("dtype", None)
        config["torch_dtype"] = dtype
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def export_hf_checkpoint(checkpoint_dir: str, out_dir: str, model_config: Optional[str] = None,
                         max_shard_bytes: int = 5 * 1024 ** 3,
                         dtype: Optional[str] = None) -> List[str]:
    """Write an HF folder (safetensors shards, index, config.json, tokenizer files) from a
    megatron checkpoint saved in any layout; single process. Returns the shard file names."""
    cfg = read_model_config(model_config or checkpoint_dir)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    cast = _DTYPES[dtype] if dtype else None
    reader = MegatronCheckpointReader(checkpoint_dir, cfg)
    _require_empty_output(out_dir)
    shards = _plan_shards(reader, cfg, cast, max_shard_bytes)
    planned = {n: s for shard in shards for _, outputs in shard for n, _, s in outputs}
    expected = expected_hf_shapes(cfg)
    missing = sorted(set(expected) - set(planned))
    if missing:
        raise ConversionError(f"{checkpoint_dir}: the checkpoint lacks tensors for "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for name, shape in planned.items():
        if expected.get(name) != shape:
            raise ConversionError(f"{checkpoint_dir}: {name} would have shape {shape}, "
                                  f"model_config implies {expected.get(name)}")
    os.makedirs(out_dir, exist_ok=True)
    files, weight_map, total = [], {}, 0
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [entry for _, outputs in shard for entry in outputs]
        with open(os.path.join(out_dir, file), "wb") as f:
            f.write(_safetensors_header(entries))
            for (name, key, offsets, shape), outputs in shard:
                block = reader.load(key, offsets, shape)
                for (hf_name, tensor), (planned_name, _, _) in zip(
                        megatron_to_hf_tensors(name, block, cfg), outputs):
                    assert hf_name == planned_name
                    tensor = tensor.to(cast or tensor.dtype).contiguous()
                    f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                    weight_map[hf_name] = file
                    total += tensor.numel() * tensor.element_size()
                del block
        files.append(file)
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    _write_hf_config(checkpoint_dir, out_dir, cfg, dtype)
    return files



# ---------------------------------------------------------------------------------------------
# HF folder -> a built model, in memory

# what an HF config.json sets that the tensor shapes do not show
_UNSHAPED_FIELDS = ("rotary_base", "rope_scaling_factor", "norm_epsilon")


def load_hf_weights(model, hf_dir: str, cfg: ModelConfig) -> None:
    """This rank's shard of `model` (built from `cfg` in any TP/PP layout, DDP-wrapped or not)
    from the HF folder's safetensors, with no checkpoint written: each parameter is made from HF
    tensors by the converter's mapping (megatron_tensor_from_hf), vocabulary rows padded with
    zeros as hf-to-megatron writes them, then this rank's tensor-parallel slice is taken (SwiGLU's
    fc1 as [gate_r; up_r]). The folder is checked against `cfg` first: the tensors and their
    shapes, and the config.json fields that change outputs without changing a shape (RoPE base
    and scaling, norm epsilon). Needs the model-parallel groups (megatron's parallel_state)."""
    from megatron.core import parallel_state as mpu

    from megatron_rl.models.unwrap import unwrap_model
    from megatron_rl.parallel.gather import global_layer_name, is_gated_fc1

    source = os.path.join(hf_dir, "config.json")
    found = model_config_from_hf(read_hf_config(hf_dir), source)
    for name in _UNSHAPED_FIELDS:
        if getattr(found, name) != getattr(cfg, name):
            raise ConversionError(f"{source} gives model.{name}={getattr(found, name)}, the "
                                  f"config has {getattr(cfg, name)}")
    reader = HFSafetensorsReader(hf_dir)
    reader.check_against(cfg)
    tp = mpu.get_tensor_model_parallel_world_size()
    rank = mpu.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for local_name, param in unwrap_model(model).named_parameters():
            name = global_layer_name(local_name, model)
            full = megatron_tensor_from_hf(name, reader.get, cfg)
            split = getattr(param, "tensor_model_parallel", False) and tp > 1
            rows = param.shape[0] * (tp if split and param.partition_dim == 0 else 1)
            if name.endswith(("word_embeddings.weight", "output_layer.weight")) and (
                    rows > full.shape[0]):  # vocabulary padding
                full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
            if split:
                dim = param.partition_dim
                parts = full.chunk(2, dim) if is_gated_fc1(name) else [full]
                full = torch.cat([part.chunk(tp, dim)[rank] for part in parts], dim)
            if tuple(full.shape) != tuple(param.shape):
                raise ConversionError(f"{hf_dir}: {', '.join(hf_names(name, cfg)) or name} "
                                      f"make a {tuple(full.shape)} shard of {name}, the model "
                                      f"holds {tuple(param.shape)}")
            param.copy_(full.to(param.dtype))
