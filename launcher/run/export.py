"""`tunefleet export`: a checkpoint of any strategy as a Hugging Face folder, in one plain process.

Reads the run's ``recipe.resolved.yaml`` (model, method), picks a complete
checkpoint (``step`` or the latest) and writes, with no process group and no Ray:

- full fine-tuning: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
  shards and ``model.safetensors.index.json`` above ``max_shard_size``; the config,
  the generation config and the tokenizer;
- adapters (LoRA, QLoRA, IA3, prefix and prompt tuning): a PEFT adapter folder
  (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer; with
  ``merge_lora`` (plain LoRA) the full model with the adapters merged in; a LoRA run
  that kept no checkpoint merges its ``final/`` adapter folder instead.

Tensors are read one output shard at a time. A DCP checkpoint (ddp, fsdp) loads
only the requested keys into fresh tensors. A DeepSpeed checkpoint goes through
DeepSpeed's ``zero_to_fp32`` in lazy mode: ZeRO-3 gathers one parameter at a time
from memory-mapped partition files, while ZeRO-2 concatenates its flat fp32
groups, so it holds the whole fp32 model once. The report gives the peak resident
memory of the process during the export: about 1.3 output shards for DCP, plus the
touched memory-mapped fp32 partitions for ZeRO-3 (and the whole fp32 model for
ZeRO-2); a smaller ``max_shard_size`` lowers it. Merging ``final/`` loads the whole
base model in fp32 with transformers (which reads any format it can), so its peak
is the fp32 model plus one output shard.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import resource
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from tunefleet.launcher.config import RESOLVED_RECIPE, MethodConfig, Recipe
from tunefleet.launcher.config.checkpoint import DEFAULT_MAX_SHARD_SIZE
from tunefleet.launcher.errors import UserError
from tunefleet.launcher.model import modeling, value_head
from tunefleet.launcher.training import checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ADAPTER_NAME = "default"  # the name PEFT gives the one adapter training attaches
_PEFT_PREFIX = "base_model.model."
_PROMPT_TABLE = f"prompt_encoder.{_ADAPTER_NAME}.embedding.weight"  # prefix/prompt tuning's virtual tokens
_SIZE = re.compile(r"^(\d+)\s*([KMG]i?B|B)?$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class ExportReport:
    out_dir: str
    checkpoint: str
    strategy: str
    kind: Literal["full", "adapter", "merged"]
    dtype: str
    num_tensors: int
    total_bytes: int  # tensor bytes written
    files: tuple[str, ...]  # the safetensors files
    start_rss_bytes: int
    peak_rss_bytes: int  # the process's peak resident memory during the export
    seconds: float

    @property
    def peak_extra_bytes(self) -> int:
        """Resident memory the export added at its peak."""
        return self.peak_rss_bytes - self.start_rss_bytes


# ----------------------------------------------------------------------------- checkpoint readers
class _DCPReader:
    """The model tensors of a DCP checkpoint (ddp, fsdp) by key, without a process group."""

    def __init__(self, state: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.state = state
        entries = FileSystemReader(str(state)).read_metadata().state_dict_metadata
        self.specs = {
            key.removeprefix("model."): (torch.Size(entry.size), entry.properties.dtype)
            for key, entry in entries.items()
            if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)
        }

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        tensors = {key: torch.empty(self.specs[key][0], dtype=self.specs[key][1]) for key in keys}
        with warnings.catch_warnings():  # it warns that it runs in one process even when told so
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"model": tensors}, checkpoint_id=str(self.state), no_dist=True)  # reads only these
        return tensors


class _DeepSpeedReader:
    """The fp32 master weights of a ZeRO-2/3 checkpoint, through DeepSpeed's ``zero_to_fp32``."""

    def __init__(self, state: Path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from tunefleet.strategies.deepspeed import CHECKPOINT_TAG

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            self.lazy = get_fp32_state_dict_from_zero_checkpoint(str(state), tag=CHECKPOINT_TAG, lazy_mode=True)
        self.specs = {key: (torch.Size(value.shape), value.dtype) for key, value in self.lazy.items()}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        # ZeRO-2's tensors are views of one flat vector; safetensors refuses tensors sharing storage.
        return {key: self.lazy[key].contiguous().clone() for key in keys}


class _AdapterFolderReader:
    """A PEFT adapter folder (a finished run's ``final/``) on its base model, by the keys a checkpoint
    of the PEFT model holds (``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``)."""

    def __init__(self, adapter_dir: Path, recipe: Recipe, model_path: str):
        import peft

        fp32 = recipe.model.model_copy(update={"dtype": "float32"})  # merge in fp32, cast when writing
        base = modeling.load_model(fp32, MethodConfig(kind="full"), model_path)
        self.state = peft.PeftModel.from_pretrained(base, str(adapter_dir)).state_dict()
        self.specs = {key: (value.shape, value.dtype) for key, value in self.state.items()}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {key: self.state[key] for key in keys}


_READERS = {"ddp": _DCPReader, "fsdp": _DCPReader,
            "deepspeed_zero2": _DeepSpeedReader, "deepspeed_zero3": _DeepSpeedReader}


# ----------------------------------------------------------------------------- what to write
@dataclass(frozen=True)
class _Entry:
    """One exported tensor: its name in the file, computed from one checkpoint key
    or, merging LoRA, from (weight, lora_A, lora_B)."""

    name: str
    sources: tuple[str, ...]


def _model_keys(skeleton: torch.nn.Module) -> tuple[list[str], set[str]]:
    """The state-dict keys ``save_pretrained`` writes, and the tied aliases it leaves out."""
    keys = list(skeleton.state_dict())
    aliases = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
    aliases -= {name for name, _ in skeleton.named_parameters()}
    return [key for key in keys if key not in aliases], aliases


def _model_entries(specs: dict, skeleton: torch.nn.Module, *, merge_lora: bool) -> list[_Entry]:
    """Entries for every weight of the model, checked against what the model class expects."""
    by_name = _merged_entries(specs) if merge_lora else {key: _Entry(key, (key,)) for key in specs}
    by_name = {key: entry for key, entry in by_name.items() if not value_head.is_value_head_key(key)}  # PPO's
    expected, aliases = _model_keys(skeleton)
    missing = [key for key in expected if key not in by_name]
    unexpected = sorted(set(by_name) - set(expected) - aliases)
    if missing or unexpected:
        raise UserError(
            f"the checkpoint does not hold the weights of {type(skeleton).__name__}: missing "
            f"{missing[:5] or 'none'}, unexpected {unexpected[:5] or 'none'}; was it written for another model.path?"
        )
    return [by_name[key] for key in expected]


def _merged_entries(specs: dict) -> dict[str, _Entry]:
    """PEFT keys to base-model names; a LoRA-adapted weight is merged from its two factors."""
    entries = {}
    for key in specs:
        if "lora_" in key or ".original_module." in key:
            continue
        name = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        name = name.replace(f".modules_to_save.{_ADAPTER_NAME}.", ".")
        module = key.removesuffix(".base_layer.weight")
        factors = (f"{module}.lora_A.{_ADAPTER_NAME}.weight", f"{module}.lora_B.{_ADAPTER_NAME}.weight")
        merged = key.endswith(".base_layer.weight") and factors[0] in specs
        entries[name] = _Entry(name, (key, *factors) if merged else (key,))
    return entries


def _adapter_entries(specs: dict) -> list[_Entry]:
    """The adapter's tensors under the names PEFT saves them with (no adapter name)."""
    if _PROMPT_TABLE in specs:  # prefix or prompt tuning (without projection): the table is the embedding
        return [_Entry("prompt_embeddings", (_PROMPT_TABLE,))]
    keys = [key for key in specs
            if "lora_" in key or "ia3_l" in key or f".modules_to_save.{_ADAPTER_NAME}." in key]
    if not keys:
        raise UserError("the checkpoint holds no adapter weights; was the run trained with method.kind full?")
    return [_Entry(key.replace("modules_to_save.", "").replace(f".{_ADAPTER_NAME}", ""), (key,)) for key in keys]


def _compute(entry: _Entry, sources: dict[str, torch.Tensor], lora_scale: float) -> torch.Tensor:
    """The exported tensor; takes its sources out of ``sources`` so that they can be freed."""
    if len(entry.sources) == 1:
        return sources.pop(entry.sources[0])
    weight, lora_a, lora_b = (sources.pop(key) for key in entry.sources)
    return weight + (lora_b @ lora_a) * lora_scale  # PEFT's merge, in its order of operations


# ----------------------------------------------------------------------------- writing
def _shards(entries: list[_Entry], specs: dict, dtype: torch.dtype, max_bytes: float) -> list[list[_Entry]]:
    """Consecutive entries, cut before a shard would exceed ``max_bytes`` (a bigger tensor stays alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        shape, source_dtype = specs[entry.sources[0]]
        nbytes = shape.numel() * (dtype if source_dtype.is_floating_point else source_dtype).itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    return [*shards, current]


def _write_tensors(reader, entries: list[_Entry], out: Path, stem: str, *, dtype: torch.dtype,
                   max_bytes: float, lora_scale: float = 0.0) -> tuple[list[str], int]:
    """Write ``entries`` shard by shard; returns the file names and the bytes written."""
    from safetensors.torch import save_file

    shards = _shards(entries, reader.specs, dtype, max_bytes)
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [
        f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    weight_map, total_bytes = {}, 0
    for shard, file_name in zip(shards, names, strict=True):
        sources = reader.read([key for entry in shard for key in entry.sources])
        tensors = {entry.name: _cast(_compute(entry, sources, lora_scale), dtype) for entry in shard}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        total_bytes += sum(tensor.nbytes for tensor in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors  # before the next shard is read
    if len(names) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names, total_bytes


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _skeleton(recipe: Recipe, model_path: str) -> torch.nn.Module:
    """The model class on the meta device: its keys, tied weights and config, no memory."""
    import transformers

    cfg = recipe.model
    extra = {"num_labels": cfg.num_labels} if cfg.num_labels is not None else {}
    config = transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code, **extra)
    auto = (transformers.AutoModelForSequenceClassification if cfg.task == "sequence_classification"
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)


def _write_configs(skeleton: torch.nn.Module, model_path: str, out: Path, dtype: torch.dtype) -> None:
    import transformers

    config = skeleton.config
    config.architectures = [type(skeleton).__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    if skeleton.can_generate():
        try:
            generation = transformers.GenerationConfig.from_pretrained(model_path)
        except OSError:  # the model folder has none: derive it as save_pretrained does
            generation = transformers.GenerationConfig.from_model_config(config)
        generation.save_pretrained(out)


def _write_adapter_config(recipe: Recipe, model_path: str, out: Path) -> None:
    """The peft config training attached (``modeling.load_model``), pointing at the base model."""
    modeling.peft_config(recipe.method, recipe.model.task, model_path).save_pretrained(out)


def _write_folder(reader, recipe: Recipe, model_path: str, out: Path, *, kind: str, dtype: torch.dtype,
                  max_bytes: float) -> tuple[list[str], int, int]:
    """Weights, configs and tokenizer into ``out``; returns files, number of tensors and bytes."""
    if kind == "adapter":
        entries = _adapter_entries(reader.specs)
        files, total_bytes = _write_tensors(reader, entries, out, "adapter_model", dtype=dtype, max_bytes=math.inf)
        _write_adapter_config(recipe, model_path, out)
    else:
        skeleton = _skeleton(recipe, model_path)
        entries = _model_entries(reader.specs, skeleton, merge_lora=kind == "merged")
        lora = recipe.method.lora
        lora_scale = lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)  # PEFT's; used to merge
        files, total_bytes = _write_tensors(reader, entries, out, "model", dtype=dtype, max_bytes=max_bytes,
                                            lora_scale=lora_scale)
        _write_configs(skeleton, model_path, out, dtype)
    modeling.load_tokenizer(model_path).save_pretrained(out)
    return files, len(entries), total_bytes


# ----------------------------------------------------------------------------- the export
class _PeakRSS:
    """Peak resident memory inside the block: sampled by a thread, and exact from
    ``ru_maxrss`` when the block raised the process's lifetime peak."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = self._process.memory_info().rss
        self._maxrss_start = _maxrss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if (maxrss := _maxrss_bytes()) > self._maxrss_start:
            self.peak = max(self.peak, maxrss)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, self._process.memory_info().rss)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def read_run_recipe(run_dir: Path) -> Recipe:
    path = run_dir / RESOLVED_RECIPE
    if not path.is_file():
        raise UserError(f"{path} not found; pass the output_dir of a run started with `tunefleet launch`")
    return Recipe.model_validate(yaml.safe_load(path.read_text()))


def find_checkpoint(recipe: Recipe, step: int | None, final: Path) -> Path:
    """The complete checkpoint of ``step``, or the latest one; ``final`` is the run's final/ folder."""
    steps = checkpoint.complete_steps(recipe.checkpoint_dir)
    if not steps:
        what = "model (a Hugging Face folder)" if recipe.method.kind == "full" else "adapter (a PEFT folder)"
        kept = f"; {final} already holds the trained {what}" if final.is_dir() else ""
        raise UserError(f"no complete checkpoint under {recipe.checkpoint_dir}; set checkpoint.every_steps{kept}")
    if step is not None and step not in steps:
        raise UserError(f"no complete checkpoint of step {step} under {recipe.checkpoint_dir}; "
                        f"complete steps: {', '.join(map(str, steps))}")
    return Path(recipe.checkpoint_dir) / f"step_{steps[-1] if step is None else step}"


def _final_to_merge(recipe: Recipe, step: int | None, final: Path) -> Path | None:
    """``final`` when --merge-lora has no checkpoint to read: no ``step`` asked for, none kept."""
    kept_none = step is None and not checkpoint.complete_steps(recipe.checkpoint_dir)
    return final if kept_none and (final / "adapter_config.json").is_file() else None


def parse_size(text: str | int) -> int:
    """Bytes from ``500MB``, ``2GiB`` or a plain number of bytes."""
    match = _SIZE.match(str(text).strip())
    if not match:
        raise UserError(f"max shard size {text!r}: write a size such as 500MB, 5GB or 2GiB")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]


def _export_kind(recipe: Recipe, merge_lora: bool) -> Literal["full", "adapter", "merged"]:
    method = recipe.method.kind
    if method == "full":
        if merge_lora:
            raise UserError("--merge-lora: the run trained the full model (method.kind full); drop the flag")
        return "full"
    if merge_lora and method == "qlora":
        raise UserError("--merge-lora: a QLoRA base is 4-bit; export the adapter and merge it into a "
                        "full-precision base with PEFT")
    if merge_lora and (method != "lora" or recipe.method.lora.use_dora):
        what = "DoRA" if method == "lora" else f"method.kind {method}"
        raise UserError(f"--merge-lora merges plain LoRA only, not {what}; export the adapter and merge it "
                        "with PEFT (`merge_and_unload`)")
    if method == "prefix_tuning" and recipe.method.virtual_tokens.projection:
        raise UserError("export of prefix tuning with method.virtual_tokens.projection is not built yet; use "
                        "the run's final/ adapter folder")
    return "merged" if merge_lora else "adapter"


def export(run_dir: str | Path, *, step: int | None = None, out: str | Path, merge_lora: bool = False,
           dtype: str = "fp32", max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> ExportReport:
    """Write checkpoint ``step`` (default: the latest) of the run in ``run_dir`` to the new folder ``out``;
    with ``merge_lora`` and neither ``step`` nor a checkpoint, the run's ``final/`` adapter merged."""
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    recipe = read_run_recipe(Path(run_dir))
    kind = _export_kind(recipe, merge_lora)
    final = Path(run_dir) / "final"
    adapter_dir = _final_to_merge(recipe, step, final) if kind == "merged" else None
    source = adapter_dir or find_checkpoint(recipe, step, final)
    strategy = recipe.parallelism.strategy if adapter_dir else checkpoint.read_meta(source)["strategy"]
    model_path = modeling.resolve_model_path(recipe.model)
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} is not empty; choose a new --out folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _PeakRSS() as memory:
            reader = (_AdapterFolderReader(adapter_dir, recipe, model_path) if adapter_dir
                      else _READERS[strategy](source / "state"))
            files, num_tensors, total_bytes = _write_folder(
                reader, recipe, model_path, staging, kind=kind, dtype=DTYPES[dtype],
                max_bytes=parse_size(max_shard_size))
            del reader
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(
        out_dir=str(target), checkpoint=str(source), strategy=strategy, kind=kind, dtype=dtype,
        num_tensors=num_tensors, total_bytes=total_bytes, files=tuple(files), start_rss_bytes=memory.start,
        peak_rss_bytes=memory.peak, seconds=time.perf_counter() - started,
    )
