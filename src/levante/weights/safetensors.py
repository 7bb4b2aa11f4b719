"""safetensors checkpoints: HF names (single or sharded) and Mistral consolidated names."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from levante.config import ModelConfig
from levante.errors import ModelFileError
from levante.weights.layout import (
    CONSOLIDATED_GLOBAL_NAMES,
    CONSOLIDATED_LAYER_NAMES,
    expected_shapes,
    hf_name,
    interleaved_to_half,
)

log = logging.getLogger(__name__)

TIED_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
TIE_KEY = {False: "tie_word_embeddings", True: "tied_embeddings"}
# Buffers some checkpoints carry that hold nothing a model computes with: rotary inverse
# frequencies follow from rope_theta (transformers recomputes them too).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
PLAIN_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def hf_shards(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: from the shard index, or model.safetensors.

    Every shard must lie inside `folder` (`inside_folder`): an index is untrusted input.
    """
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(index, f"malformed shard index ({e!r})") from None
        return [inside_folder(folder, name, listed_in=index) for name in names]
    single = folder / "model.safetensors"
    if single.exists():
        return [inside_folder(folder, single.name, listed_in=folder)]
    raise ModelFileError(folder, "no model.safetensors or model.safetensors.index.json")


def consolidated_shards(folder: Path) -> list[Path]:
    """The consolidated*.safetensors files of a Mistral folder, each inside it."""
    files = sorted(folder.glob("consolidated*.safetensors"))
    if not files:
        raise ModelFileError(folder, "no consolidated*.safetensors file")
    return [inside_folder(folder, file.name, listed_in=folder) for file in files]


def inside_folder(folder: Path, name: object, *, listed_in: Path) -> Path:
    """`folder / name` for a shard `listed_in` names; ModelFileError naming both if the shard
    is not a relative name, climbs out ("../x"), or is a symbolic link leading out.

    A Hugging Face cache snapshot (…/snapshots/REV/) may link into its repo's blobs/ folder:
    that is where huggingface_hub keeps every file.
    Example: "model-00001-of-00002.safetensors" -> folder/model-00001-of-00002.safetensors;
    "/etc/passwd", "../other/model.safetensors" -> refused.
    """
    if not isinstance(name, str) or not name:
        raise ModelFileError(listed_in, f"shard name {name!r} is not a file name")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise ModelFileError(listed_in, f"shard {name!r} lies outside the model folder "
                             f"{folder}: a checkpoint may only name files inside its folder")
    path = folder / name
    real, roots = path.resolve(), [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    if not any(real.is_relative_to(root) for root in roots):
        raise ModelFileError(listed_in, f"shard {name!r} is a symbolic link to {real}, outside "
                             f"the model folder {folder}: a checkpoint may only name files "
                             "inside its folder")
    return path


def load_safetensors_state_dict(files: list[Path], config: ModelConfig, *, dtype: torch.dtype,
                                consolidated: bool = False,
                                row_groups: Sequence[tuple[str, ...]] = ()
                                ) -> dict[str, torch.Tensor]:
    """Read tensors into our (HF) names, checked against the config.

    Every tensor's name, shape and dtype is checked from the file headers before any weight
    is read (`check_safetensors_files`). Consolidated checkpoints are renamed and their q/k
    rows un-permuted to rotate-half. A tensor used as stored stays in the file's memory map
    (no copy; its pages count once, when touched). A tensor that must be copied (to another
    dtype, un-permuted, or joined) is read with plain file reads: a copy made through the map
    would leave every page it touched resident beside the copy. Each of `row_groups` (our
    names, e.g. a layer's q/k/v) is read into one buffer as consecutive rows, each tensor a
    view of its rows, so joining them later (`Transformer.fuse_projections`) copies nothing.
    """
    sources = check_safetensors_files(files, config, consolidated=consolidated)
    layouts = {path: _tensor_layouts(path) for path in files}
    row_groups = [group for group in row_groups  # a dtype without a plain read: as stored
                  if all(sources[name][1] in layouts[sources[name][0]] for name in group)]
    grouped = {name for group in row_groups for name in group}
    state: dict[str, torch.Tensor] = {}
    for path in files:
        wanted = {name: target for target, (where, name) in sources.items()
                  if where == path and target not in grouped}
        if not wanted:
            continue
        try:
            with safe_open(path, framework="pt") as f:
                for name, target in wanted.items():
                    layout = layouts[path].get(name)
                    if layout is None or (layout.dtype == dtype
                                          and not _is_permuted(target, consolidated)):
                        tensor = _converted(f.get_tensor(name), target, config, consolidated)
                    else:
                        tensor = _converted(layout.read(), target, config, consolidated)
                    state[target] = tensor.to(dtype)
        except SafetensorError as e:
            raise ModelFileError(path, f"not a valid safetensors file ({e})") from None
    for group in row_groups:
        state.update(_read_rows_joined(group, sources, layouts, config, dtype, consolidated))
    head = state.pop(TIED_HEAD, None) if config.tie_embeddings else None
    if head is not None and not torch.equal(head, state[EMBEDDING]):
        path, name = sources[TIED_HEAD]
        raise ModelFileError(path, f"tensor {name} differs from the embedding, but "
                             f"{_config_file(consolidated)} ties the output head to the "
                             f"embedding ({TIE_KEY[consolidated]} true): Levante will not "
                             f"guess which of the two the model computes with")
    return state


def check_safetensors_files(files: list[Path], config: ModelConfig, *, consolidated: bool = False
                            ) -> dict[str, tuple[Path, str]]:
    """Where each tensor the config needs lies, {our name: (file, stored name)}, from headers.

    Refuses (ModelFileError naming the file and tensor) a shape or dtype the config does not
    imply, a tensor the model has no place for (biases, unknown names, an output head in a
    tied model unless it equals the embedding), a name stored twice, and missing tensors.
    """
    required = expected_shapes(config)
    # A tied model may store its head too: accepted if it equals the embedding (checked on read).
    allowed = {**required, TIED_HEAD: required[EMBEDDING]} if config.tie_embeddings else required
    sources: dict[str, tuple[Path, str]] = {}
    for path in files:
        if not path.exists():
            raise ModelFileError(path, "shard listed in the index is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    target = _placed(path, name, f.get_slice(name), allowed, config,
                                     consolidated=consolidated)
                    if target in sources:
                        raise ModelFileError(path, f"tensor {name} is also stored in "
                                             f"{sources[target][0]}")
                    if target is not None:
                        sources[target] = (path, name)
        except SafetensorError as e:
            raise ModelFileError(path, f"not a valid safetensors file ({e})") from None
    missing = sorted((n for n in required if n not in sources), key=lambda n: n != TIED_HEAD)
    if missing:
        where = files[0] if len(files) == 1 else files[0].parent
        untied = (f" ({_config_file(consolidated)} has {TIE_KEY[consolidated]} false: the "
                  f"output head is its own tensor)" if missing[0] == TIED_HEAD else "")
        raise ModelFileError(where, f"missing tensor {missing[0]}{untied}"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return sources


def _target_name(name: str, consolidated: bool) -> str | None:
    if not consolidated:
        return name
    return hf_name(name, layer_names=CONSOLIDATED_LAYER_NAMES,
                   global_names=CONSOLIDATED_GLOBAL_NAMES, layer_prefix="layers.")


def _placed(path: Path, name: str, header: Any, allowed: dict[str, tuple[int, ...]],
            config: ModelConfig, *, consolidated: bool) -> str | None:
    """Our name for stored tensor `name` after checking its header; None for a known no-op."""
    target = _target_name(name, consolidated)
    if target is None or target not in allowed:
        if name.endswith(IGNORED_SUFFIXES):
            log.debug("%s: ignoring tensor %s", path, name)
            return None
        if name.endswith(".bias"):
            raise ModelFileError(path, f"tensor {name} is a bias: projection biases "
                                 "(attention_bias, mlp_bias, Qwen2-style q/k/v biases) are not "
                                 "implemented in Levante")
        raise ModelFileError(path, f"tensor {name} has no place in the model "
                             f"{_config_file(consolidated)} describes ({config.num_layers} "
                             f"layers, {TIE_KEY[consolidated]} {config.tie_embeddings}): Levante "
                             f"would not compute with it")
    shape = tuple(header.get_shape())
    if shape != allowed[target]:
        raise ModelFileError(path, f"tensor {name} has shape {shape}, expected "
                             f"{allowed[target]} from the config")
    if not header.get_dtype().startswith(("F", "BF")):
        raise ModelFileError(path, f"tensor {name} has dtype {header.get_dtype()}, expected "
                             "a float")
    return target


@dataclass(frozen=True)
class _Layout:
    """Where a tensor's bytes lie in its file, for reading without the memory map."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor read with plain file reads, into `out` (contiguous, same dtype) if given."""
        tensor = torch.empty(self.shape, dtype=self.dtype) if out is None else out
        buffer = tensor.view(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(self.start)
            num_read = f.readinto(buffer.data)
        if num_read != buffer.nbytes:
            raise ModelFileError(self.path, f"tensor {self.name} is truncated")
        return tensor


def _tensor_layouts(path: Path) -> dict[str, _Layout]:
    """{stored name: layout} for the float tensors a plain read can load (BF16, F16, F32).

    The header was already validated by safetensors (`check_safetensors_files`).
    """
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: _Layout(path, name, PLAIN_DTYPES[info["dtype"]], tuple(info["shape"]),
                          8 + size + info["data_offsets"][0])
            for name, info in header.items()
            if name != "__metadata__" and info["dtype"] in PLAIN_DTYPES}


def _read_rows_joined(group: tuple[str, ...], sources: dict[str, tuple[Path, str]],
                      layouts: dict[Path, dict[str, _Layout]], config: ModelConfig,
                      dtype: torch.dtype, consolidated: bool) -> dict[str, torch.Tensor]:
    """The tensors of `group` as consecutive row blocks of one new `dtype` buffer.

    Example: q [1024, 1280], k [256, 1280], v [256, 1280] -> one [1536, 1280] buffer;
    q is its rows 0-1023, k rows 1024-1279, v rows 1280-1535.
    """
    parts = [layouts[sources[name][0]][sources[name][1]] for name in group]
    joined = torch.empty(sum(p.shape[0] for p in parts), parts[0].shape[1], dtype=dtype)
    views, start = {}, 0
    for name, part in zip(group, parts):
        rows = joined[start:start + part.shape[0]]
        if part.dtype == dtype and not _is_permuted(name, consolidated):
            part.read(out=rows)
        else:
            rows.copy_(_converted(part.read(), name, config, consolidated))
        views[name], start = rows, start + part.shape[0]
    return views


def _is_permuted(target: str, consolidated: bool) -> bool:
    return consolidated and target.endswith(("q_proj.weight", "k_proj.weight"))


def _converted(tensor: torch.Tensor, target: str, config: ModelConfig,
               consolidated: bool) -> torch.Tensor:
    """Consolidated q/k rows from interleaved to rotate-half order; others as they are."""
    if consolidated and target.endswith("q_proj.weight"):
        return interleaved_to_half(tensor, config.num_heads)
    if consolidated and target.endswith("k_proj.weight"):
        return interleaved_to_half(tensor, config.num_kv_heads)
    return tensor


def _config_file(consolidated: bool) -> str:
    return "params.json" if consolidated else "config.json"
