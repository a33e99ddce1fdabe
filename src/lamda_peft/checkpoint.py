"""Adapter files: atomic `save_pretrained`, validated `from_pretrained`.

On disk (PEFT's file names): `adapter_config.json` and `adapter_model.safetensors`, the latter
holding only adapter tensors (`<module>.lamda_A`, `.lamda_B0`, `.lamda_S0`, `.lamda_dS`,
`.lamda_dB`, `.lamda_frozen`, `.lamda_step`) and the `modules_to_save` weights (`<module>.<param>`).
Its metadata carries the SHA-256 of the config it was written with, so a folder whose two files
come from different saves (a crash between the two renames) is refused.

Loading reads only JSON and safetensors and checks every tensor (name, shape, dtype, finite)
against the base model before the model is modified. The safetensors header is parsed here first
(`parse_safetensors_header`): its length, dtypes, shapes and byte ranges must fit the file, so no
tensor is read, and nothing is allocated beyond the file's size (itself under `max_file_bytes`),
until the file has been shown to be well formed. Either file may be a symlink only if it resolves
inside the adapter folder. W_res is rebuilt from the saved A and B0,
never from a new SVD, so a reloaded model is bitwise the saved one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lamda_peft.config import CONFIG_NAME, ConfigError, LamdaConfig
from lamda_peft.layer import linear_shape, torch_layout_weight
from lamda_peft.spectral import SpectralFactors
from lamda_peft.targets import find_targets, module_to_save

WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "lamda-peft/1"
_ADAPTER_KEYS = ("lamda_A", "lamda_B0", "lamda_S0", "lamda_dS", "lamda_dB", "lamda_frozen", "lamda_step")
# Config fields a checkpoint's tensors only make sense with (resumption compares them): the scaling
# dS and dB were trained at, the schedule that froze B, and the frozen base they sit on
_RUN_FIELDS = (
    "r", "rank_pattern", "alpha", "alpha_pattern", "init", "dropout", "freeze_fraction", "freeze_order",
    "quantize", "quant_backend", "quant_blocksize", "loftq_iters", "quantized_residual_sha256",
)  # fmt: skip
DEFAULT_MAX_FILE_BYTES = 8 * 2**30  # a user can raise it: load_adapter(..., max_file_bytes=...)
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit on the JSON header
MAX_CONFIG_BYTES = 16 * 2**20  # adapter_config.json: a rank_pattern for thousands of modules fits
# safetensors dtype names and their sizes in bytes (the format's full list).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class AdapterLoadError(ValueError):
    """An adapter folder cannot be loaded onto this base model; nothing was modified."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def adapter_state_dict(lamda_model) -> dict[str, torch.Tensor]:
    """Adapter tensors and modules_to_save weights, keyed as in the safetensors file."""
    state = {}
    for name, layer in lamda_model.lamda_layers():
        for key, tensor in zip(
            _ADAPTER_KEYS, (layer.A, layer.B0, layer.S0, layer.dS, layer.dB, layer.frozen, layer.step), strict=True
        ):
            state[f"{name}.{key}"] = tensor.detach().contiguous().cpu()
    for prefix, module in lamda_model.modules_to_save():
        for pname, p in module.state_dict().items():
            state[f"{prefix}.{pname}"] = p.detach().contiguous().cpu()
    return state


def _config_bytes(config: LamdaConfig) -> bytes:
    return (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its metadata keys sorted (byte-reproducible saves).

    The safetensors library writes `__metadata__` from a hash map whose order changes from process
    to process; the same adapter must give the same bytes. Tensor entries and data are unchanged
    (their offsets are relative to the end of the header, which stays 8-byte aligned).
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    header = {"__metadata__": header.pop("__metadata__"), **header}
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + data[8 + n :]


def save_adapter(lamda_model, directory: str | Path) -> Path:
    """Write the adapter folder atomically (each file is replaced whole, weights first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_bytes = _config_bytes(lamda_model.config)
    metadata = {"format": FORMAT, "config_sha256": hashlib.sha256(config_bytes).hexdigest()}
    weights = _canonical_header(safetensors_bytes(adapter_state_dict(lamda_model), metadata=metadata))
    atomic_write_bytes(directory / WEIGHTS_NAME, weights)
    atomic_write_bytes(directory / CONFIG_NAME, config_bytes)
    return directory


def parse_safetensors_header(data: bytes, file_size: int | None = None) -> tuple[dict, dict[str, str]]:
    """Parse and check the header of a safetensors file without reading any tensor.

    Layout: 8 bytes little-endian header length n, n bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the tensor bytes.

    Args:
        data: the file's first bytes (at least 8 + n of them).
        file_size: the whole file's size (default: len(data)); every byte range must fit in it.

    Returns:
        ({name: (dtype name, shape tuple)}, metadata).

    Raises:
        AdapterLoadError: naming the first thing that is wrong.
    """
    file_size = len(data) if file_size is None else file_size
    if len(data) < 8:
        raise AdapterLoadError(f"file is {len(data)} bytes, shorter than the 8-byte safetensors header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise AdapterLoadError(f"safetensors header length {n} is over the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size or len(data) < 8 + n:
        raise AdapterLoadError(f"safetensors header length {n} runs past the end of the {file_size}-byte file")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AdapterLoadError(f"safetensors header is not valid JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise AdapterLoadError(f"safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterLoadError("safetensors __metadata__ must map strings to strings")
    data_bytes = file_size - 8 - n
    specs = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise AdapterLoadError(f"tensor {name!r}: header entry must hold exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise AdapterLoadError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise AdapterLoadError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise AdapterLoadError(f"tensor {name!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_bytes:
            raise AdapterLoadError(
                f"tensor {name!r}: bytes [{begin}, {end}) lie outside the file's {data_bytes} data bytes"
            )
        if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise AdapterLoadError(
                f"tensor {name!r}: shape {shape} of {dtype} needs {math.prod(shape) * _DTYPE_BYTES[dtype]} bytes, "
                f"the header gives it {end - begin}"
            )
        specs[name] = (dtype, tuple(shape))
    return specs, metadata


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _inside_folder(path: Path) -> None:
    """Refuse a symlink (or a link chain) that leads out of the adapter folder."""
    if path.is_symlink() and not path.resolve().is_relative_to(path.parent.resolve()):
        raise AdapterLoadError(f"{path} is a symlink to {path.resolve()}, outside its folder; refusing to follow it")


def _load_config(directory: Path) -> LamdaConfig:
    """`LamdaConfig.load` behind the folder checks: no symlink out, a size limit, no deep nesting."""
    path = directory / CONFIG_NAME
    _inside_folder(path)
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size} bytes, over the limit of {MAX_CONFIG_BYTES}")
    try:
        return LamdaConfig.load(directory)
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None


def _read_tensors(path: Path, config_bytes: bytes, max_file_bytes: int) -> dict[str, torch.Tensor]:
    _inside_folder(path)
    if not path.is_file():
        raise AdapterLoadError(f"missing {path.name} in {path.parent}: not a complete adapter folder")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise AdapterLoadError(f"{path} is {size} bytes, over the limit of {max_file_bytes} (raise max_file_bytes)")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) == 8:
            prefix += f.read(min(int.from_bytes(prefix, "little"), MAX_HEADER_BYTES))
    try:
        _, metadata = parse_safetensors_header(prefix, size)
    except AdapterLoadError as err:
        raise AdapterLoadError(f"{path} is not a valid safetensors file: {err}") from None
    if metadata.get("format") != FORMAT:
        raise AdapterLoadError(f"{path} was not written by lamda-peft (metadata format {metadata.get('format')!r})")
    if metadata.get("config_sha256") != hashlib.sha256(config_bytes).hexdigest():
        raise AdapterLoadError(
            f"{path} and its {CONFIG_NAME} come from different saves (config hash mismatch): the folder is "
            "inconsistent, probably from an interrupted overwrite"
        )
    try:  # the header is sound and every tensor fits in the file: reading is bounded by its size
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types (overlapping ranges, ...)
        raise AdapterLoadError(f"{path} is not a valid safetensors file ({type(err).__name__}: {err})") from None


def _expect(tensors: dict, key: str, shape: tuple, dtypes: tuple, where: str) -> torch.Tensor:
    if key not in tensors:
        raise AdapterLoadError(f"{where}: tensor {key!r} is missing from the adapter file")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise AdapterLoadError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise AdapterLoadError(f"{where}: tensor {key!r} has dtype {t.dtype}, expected one of {dtypes}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise AdapterLoadError(f"{where}: tensor {key!r} holds NaN or Inf values")
    return t


def load_adapter(model: nn.Module, directory: str | Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    """Restore a saved LaMDA adapter onto a pristine `model` (the same base it was trained on).

    Every tensor is checked before anything is modified; on error the model is untouched.

    Raises:
        FileNotFoundError: the folder or its config is missing.
        ConfigError: the config is invalid (unknown keys, bad values, not a LaMDA adapter).
        AdapterLoadError: the weights file is missing, corrupt, or does not fit this base model.
    """
    from lamda_peft.model import LamdaModel

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    config = _load_config(directory)
    # The hash is over the config's canonical JSON form, as save_adapter wrote it.
    tensors = _read_tensors(directory / WEIGHTS_NAME, _config_bytes(config), max_file_bytes)
    try:
        targets = find_targets(model, config.target_modules, exclude=config.modules_to_save)
    except ValueError as err:
        raise AdapterLoadError(f"{directory}: this base model does not fit the adapter: {err}") from None
    factors, states, expected = {}, {}, set()
    for name in targets:
        base = model.get_submodule(name)
        d_out, d_in = linear_shape(base)
        r = config.rank_for(name)
        where = f"{directory}: module {name!r} ({d_out}x{d_in}, rank {r})"
        if r > min(d_out, d_in):
            raise AdapterLoadError(f"{where}: the rank exceeds min(d_out, d_in) = {min(d_out, d_in)}")
        floats = (torch.float32, torch.float64)
        A = _expect(tensors, f"{name}.lamda_A", (r, d_in), floats, where)
        B0 = _expect(tensors, f"{name}.lamda_B0", (d_out, r), (A.dtype,), where)
        S0 = _expect(tensors, f"{name}.lamda_S0", (r, r), (A.dtype,), where)
        dS = _expect(tensors, f"{name}.lamda_dS", (r, r), (A.dtype,), where)
        dB = _expect(tensors, f"{name}.lamda_dB", (d_out, r), (A.dtype,), where)
        frozen = _expect(tensors, f"{name}.lamda_frozen", (r,), (torch.bool,), where)
        step = _expect(tensors, f"{name}.lamda_step", (), (torch.int64,), where)
        if int(step) < 0:
            raise AdapterLoadError(f"{where}: lamda_step is negative ({int(step)})")
        expected.update(f"{name}.{k}" for k in _ADAPTER_KEYS)
        factors[name] = SpectralFactors(A, B0, S0, torch.zeros(r, dtype=A.dtype, device=A.device))
        states[name] = (dS, dB, frozen, step)
    saved_modules = {}
    for module_name in config.modules_to_save or []:
        try:
            prefix, module = module_to_save(model, module_name)  # the rule saving used
        except ConfigError as err:
            raise AdapterLoadError(f"{directory}: {err}") from None
        for pname, p in module.state_dict().items():
            key = f"{prefix}.{pname}"
            _expect(tensors, key, tuple(p.shape), (p.dtype,), f"{directory}: module {prefix!r}")
            expected.add(key)
            saved_modules[key] = (module, pname)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise AdapterLoadError(f"{directory}: unexpected tensors in {WEIGHTS_NAME} for this base model: {extra[:5]}")
    # Everything checked: now modify the model. LamdaModel first: a quantized base is verified
    # against its saved digest there, and a refusal must leave modules_to_save untouched too.
    lamda_model = LamdaModel(model, config, factors=factors, reload=True)
    for key, (module, pname) in saved_modules.items():
        module.load_state_dict({pname: tensors[key]}, strict=False)
    for name, layer in lamda_model.lamda_layers():
        dS, dB, frozen, step = states[name]
        with torch.no_grad():
            device = torch_layout_weight(layer.base_layer).device
            layer.dS.copy_(dS.to(device))
            layer.dB.copy_(dB.to(device))
            layer.frozen.copy_(frozen.to(device))
            layer.step.copy_(step.to(device))
        layer.sync_frozen_state()
    return lamda_model


def load_adapter_state(lamda_model, directory: str | Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
    """Load a checkpoint's trainable state into an already-wrapped `LamdaModel` (resumption).

    The frozen factors (A, B0, S0) in the checkpoint must equal the model's: the run is resumed on
    the same base with the same deterministic initialisation. dS, dB, the freeze mask, the step
    counter and the modules_to_save weights are restored; nothing is modified if a check fails.
    """
    directory = Path(directory)
    config = _load_config(directory)
    tensors = _read_tensors(directory / WEIGHTS_NAME, _config_bytes(config), max_file_bytes)
    merged = [name for name, layer in lamda_model.lamda_layers() if layer.merged]
    if merged:  # unmerge() would then take out the loaded delta, not the one that was merged
        raise AdapterLoadError(f"{directory}: module {merged[0]!r} is merged; unmerge() before loading a checkpoint")
    for field in _RUN_FIELDS:  # e.g. the same A, B0, S0 under another alpha, schedule or quantized base
        saved, current = getattr(config, field), getattr(lamda_model.config, field)
        if saved == current:
            continue
        if field == "quantized_residual_sha256":
            raise AdapterLoadError(
                f"{directory}: the checkpoint's quantized bases differ from this model's ({field} mismatch): "
                "resume on the same base model with the same quantization settings"
            )
        raise AdapterLoadError(
            f"{directory}: checkpoint was trained with {field}={saved!r}, this model has {field}={current!r}: "
            "resume with the settings the run started with"
        )
    own = adapter_state_dict(lamda_model)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise AdapterLoadError(
            f"{directory}: checkpoint does not match this model (missing {missing[:3]}, extra {extra[:3]})"
        )
    for key, value in own.items():
        saved = tensors[key]
        if saved.shape != value.shape or saved.dtype != value.dtype:
            raise AdapterLoadError(
                f"{directory}: tensor {key!r} is {tuple(saved.shape)} {saved.dtype}, expected {tuple(value.shape)} {value.dtype}"
            )
        if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
            raise AdapterLoadError(f"{directory}: tensor {key!r} holds NaN or Inf values")
        if key.endswith(".lamda_step") and int(saved) < 0:
            raise AdapterLoadError(f"{directory}: {key!r} is negative ({int(saved)})")
        if key.endswith((".lamda_A", ".lamda_B0", ".lamda_S0")) and not torch.equal(saved, value):
            raise AdapterLoadError(
                f"{directory}: frozen factor {key!r} differs from this model's: not the same base/init"
            )
    state = dict(lamda_model.model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key, saved in tensors.items():
            module_key = key.replace(".lamda_", ".") if ".lamda_" in key else key
            target = state[module_key]
            target.copy_(saved.to(target.device))
    for _, layer in lamda_model.lamda_layers():
        layer.sync_frozen_state()
