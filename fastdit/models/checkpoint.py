"""DiT weights on disk: the release's ``.pt`` files, ``.safetensors`` files, and the directories
``save_pretrained`` writes (``config.json`` + ``model.safetensors``).

fastdit never downloads: a checkpoint is a local path, or the name of a model that ships inside the package
(``NAMED_MODELS``: ``fastdit.load("digits")``). The release publishes plain state dicts
(DiT-XL-2-256x256.pt) and its training script saves ``{"model", "ema", "opt", "args"}``; fastdit's
trainer saves ``{"model", "ema", "optimizer", "config", "model_config", ...}``. All load with
``torch.load(weights_only=True)``, which unpickles tensors and containers only. Where no config is
stored with the weights (``model_config``, the safetensors header, ``config.json``), it is read off
the tensors' shapes (``infer_config``). Weights that are not finite are refused unless asked for.
"""
import argparse
import json
import math
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastdit._version import __version__
from fastdit.integrations import diffusers_folders, hub
from fastdit.io import atomic_path, write_text_atomic
from fastdit.models.config import (
    CONFIG_KEYS,
    PAPER_NUM_HEADS,
    RELEASE_CLASS_DROPOUT,
    CheckpointError,
    MissingNumHeadsError,
    NonFiniteWeightsError,
    model_config,
    read_json_object,
)
from fastdit.models.validation import first_nonfinite

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fastdit"
FORMAT_VERSION = 1
# The config also rides in the safetensors header, so a weights file moved out of its
# directory still says what model it is (num_heads cannot be read off the shapes).
CONFIG_METADATA_KEY = "fastdit_config"

WEIGHTS = ("ema", "model")  # the two sets of weights a training checkpoint holds
# A checkpoint folder's recommended sampling settings (``fastdit.diffusion.settings``), kept with the model as
# ``model.sampling_defaults`` and written back by save_pretrained.
SAMPLING_FILE = "sampling.json"
# The names ``fastdit.load`` understands besides paths (a path with a separator, ./digits, is always a path).
NAMED_MODELS = {
    "digits": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits"),
}

RELEASE_HINT = (
    "the release's checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) are published by "
    "facebookresearch/DiT at https://dl.fbaipublicfiles.com/DiT/models/; download one and pass its "
    "local path (fastdit never downloads at run time); the models that ship inside fastdit load by name: "
    + ", ".join(NAMED_MODELS)
)


def build(model_class, path, *, config: dict | None = None, device="cpu", dtype=None, weights=None,
          allow_nonfinite=False, **options):
    """A ``model_class`` (``fastdit.DiT`` or ``fastdit.reference.DiT``) in eval mode with the weights at
    ``path``: a ``.pt`` file (a state dict, or a training checkpoint: a dict with ``model`` and/or ``ema``),
    a ``.safetensors`` file, or a ``save_pretrained`` directory. ``weights`` picks a training checkpoint's
    "ema" or "model" weights (None: "ema" where there are both). ``config`` (constructor arguments)
    overrides the stored or inferred config; ``options`` are constructor arguments that are not the
    weights' (``attn_backend``); ``dtype=None`` keeps the stored dtype. Loading is strict, and weights
    holding NaN or inf (after the cast to ``dtype``) are a CheckpointError unless ``allow_nonfinite``.
    The class is an argument so that this module does not import the fast model, which loads through it."""
    given = _checked_config(config)
    device = _checked_device(device)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
    path = NAMED_MODELS.get(path, path) if isinstance(path, str) else path
    state_dict, stored = read(path, weights)
    model_arguments = {**stored, **given} if stored is not None else infer_config(state_dict, given)
    # Built on the meta device: no time spent initialising weights that are replaced at once.
    with torch.device("meta"):
        model = model_class(**model_arguments, **options)
    _check_matches(model, state_dict, path, model_arguments)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.to(dtype=dtype)  # on the CPU, so that the check below costs no device syncs
    if not allow_nonfinite:
        _check_finite(model, path)
    if os.path.isfile(os.path.join(path, SAMPLING_FILE)):
        model.sampling_defaults = read_json_object(os.path.join(path, SAMPLING_FILE))
    return model.to(device=device).eval()


def read(path, weights=None) -> tuple[dict, dict | None]:
    """(state dict on the CPU, the stored config or None) from any supported checkpoint; ``weights``:
    a training checkpoint's "ema" or "model" (None: "ema" where there are both). Besides fastdit's and the
    release's files: a diffusers pipeline root or DiT transformer folder, and a Hugging Face repo id
    ("facebook/DiT-XL-2-256") found in the local cache."""
    if hub.is_repo_id(path):
        path = hub.resolve_repo_id(path)
    path = _checked_path(path)
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {', '.join(WEIGHTS)} or None, got {weights!r}")
    if diffusers_folders.is_diffusers_folder(path):
        if weights is not None:
            raise CheckpointError(f"weights={weights!r}: {path} is a diffusers folder, one set of weights; only a "
                                  "training checkpoint (.pt with 'model' and 'ema') holds two to choose from")
        return diffusers_folders.read_diffusers(path)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        state_dict, stored = _read_directory(path) if os.path.isdir(path) else _read_safetensors(path)
        if weights is not None:
            raise CheckpointError(f"weights={weights!r}: {path} holds one set of weights; only a training "
                                  "checkpoint (.pt with 'model' and 'ema') holds two to choose from")
        return state_dict, stored
    return _read_torch(path, weights)


def infer_config(state_dict: dict, config: dict | None = None) -> dict:
    """The DiT constructor arguments that give these tensors' shapes. Values in ``config`` win and
    settle what the shapes cannot tell: ``num_heads`` for a width the paper does not use, and whether
    the label table's last row is the null class (assumed, as in every release model, unless
    ``num_classes`` or ``class_dropout_prob`` is given)."""
    given = _checked_config(config)
    hidden_size, in_channels, patch_size, patch_width = _shape(state_dict, "x_embedder.proj.weight", 4)
    if patch_size != patch_width:
        raise CheckpointError(f"x_embedder.proj.weight: expected square patches, got {patch_size}x{patch_width}")
    tokens = _shape(state_dict, "pos_embed", 3)[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed: expected a square grid of tokens, got {tokens} tokens")
    block_indices = {int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key))}
    if not block_indices:
        raise CheckpointError("not a DiT state dict: it has no transformer blocks (no 'blocks.0.*' keys)")
    mlp_hidden = _shape(state_dict, "blocks.0.mlp.fc1.weight", 2)[0]
    out_features = _shape(state_dict, "final_layer.linear.weight", 2)[0]
    out_channels = out_features // patch_size**2
    if out_channels * patch_size**2 != out_features or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"final_layer.linear.weight: expected {in_channels * patch_size**2} or {2 * in_channels * patch_size**2} "
            f"output features (patch {patch_size}, {in_channels} channels, with or without learned sigma), "
            f"got {out_features}"
        )
    num_heads = given.get("num_heads", PAPER_NUM_HEADS.get(hidden_size))
    if num_heads is None:
        raise MissingNumHeadsError(hidden_size)
    inferred = dict(
        input_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=max(block_indices) + 1,
        num_heads=num_heads,
        mlp_ratio=mlp_hidden / hidden_size,
        learn_sigma=out_channels == 2 * in_channels,
        block=_block_design(state_dict, hidden_size),
        **_label_config(_shape(state_dict, "y_embedder.embedding_table.weight", 2)[0], given),
    )
    return {**inferred, **given}


SAVE_FORMATS = ("fastdit", "diffusers")


def save_pretrained(model, directory, format="fastdit") -> None:
    """Write ``directory/model.safetensors`` (the state dict) and ``directory/config.json`` (the
    constructor arguments), each atomically; the directory is created if needed. ``format="diffusers"``
    writes a folder that diffusers' ``DiTTransformer2DModel.from_pretrained`` loads instead
    (``fastdit.integrations.diffusers_folders.write_diffusers``)."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(map(repr, SAVE_FORMATS))}, got {format!r}")
    quantization = getattr(getattr(model, "_orig_mod", model), "quantization", None)
    if quantization is not None:  # the quantized weights are derived, once, from the bf16 ones at load
        raise ValueError(f"save_pretrained: the model is quantized to {quantization}; save the bf16 model and load "
                         f"it with quantize={quantization!r}")
    if format == "diffusers":
        diffusers_folders.write_diffusers(model, directory)
        return
    config = model_config(model)
    model = getattr(model, "_orig_mod", model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(os.path.join(directory, WEIGHTS_FILE)) as temporary:
        save_file(tensors, temporary, metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config)})
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "fastdit_version": __version__}
    write_text_atomic(os.path.join(directory, CONFIG_FILE), json.dumps({**header, **config}, indent=2) + "\n")
    if getattr(model, "sampling_defaults", None) is not None:
        write_text_atomic(os.path.join(directory, SAMPLING_FILE), json.dumps(model.sampling_defaults, indent=2) + "\n")


# --- readers --------------------------------------------------------------------------------


def _read_torch(path, weights) -> tuple[dict, dict | None]:
    try:
        # The release's training checkpoints also pickle their argparse.Namespace of arguments.
        with torch.serialization.safe_globals([argparse.Namespace]):
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}): it is truncated, not a PyTorch file, or holds "
            f"objects other than tensors (fastdit reads .pt files with torch.load(weights_only=True))"
        ) from error
    stored = None
    training = isinstance(contents, dict) and any(isinstance(contents.get(key), dict) for key in WEIGHTS)
    if training:
        held = [key for key in WEIGHTS if isinstance(contents.get(key), dict)]
        chosen = weights or held[0]
        if chosen not in held:
            raise CheckpointError(f"weights={chosen!r}: {path} holds only the {held[0]!r} weights")
        # fastdit's trainer stores the constructor arguments: widths and heads the shapes cannot tell.
        if contents.get("model_config") is not None:
            stored = _checked_config(contents["model_config"], f"{path}: model_config")
        contents = contents[chosen]
    elif weights is not None:
        raise CheckpointError(f"weights={weights!r}: {path} is a plain state dict, one set of weights; only a "
                              "training checkpoint (with 'model' and 'ema') holds two to choose from")
    return _checked_state_dict(contents, path), stored


def _read_safetensors(path) -> tuple[dict, dict | None]:
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            state_dict = {key: file.get_tensor(key) for key in file.keys()}
        stored = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else None
    except Exception as error:
        raise CheckpointError(f"cannot read safetensors file {path} ({type(error).__name__}: {error})") from error
    return _checked_state_dict(state_dict, path), None if stored is None else _checked_config(stored, path)


def _read_directory(path) -> tuple[dict, dict]:
    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    class_name = _diffusers_class(config_path)
    if class_name is not None:  # a diffusers folder of another model: name it, not the file it lacks
        raise CheckpointError(f"{config_path}: a diffusers {class_name!r}, not a DiT; fastdit reads a diffusers DiT "
                              f"({', '.join(diffusers_folders.TRANSFORMER_CLASSES)}) or a fastdit save_pretrained "
                              "folder")
    for required in (config_path, weights_path):
        if not os.path.isfile(required):
            raise CheckpointError(
                f"{path} is not a fastdit checkpoint directory: it has no {os.path.basename(required)} "
                f"(save_pretrained writes {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    stored = read_json_object(config_path)
    if stored.pop("format", None) != FORMAT:
        raise CheckpointError(f"{config_path} is not a fastdit config (no \"format\": \"{FORMAT}\")")
    version = stored.pop("format_version", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {version!r}; this fastdit reads up to {FORMAT_VERSION}"
        )
    stored.pop("fastdit_version", None)
    state_dict, _ = _read_safetensors(weights_path)
    return state_dict, _checked_config(stored, config_path)


def _diffusers_class(config_path) -> str | None:
    """The ``_class_name`` of a diffusers config.json, None when the file is no diffusers config."""
    config = read_json_object(config_path, required=False)
    name = config.get("_class_name") if config is not None else None
    return str(name) if name is not None else None


# --- checks ---------------------------------------------------------------------------------


def _checked_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file or directory path, got {type(path).__name__}")
    path = NAMED_MODELS.get(os.fspath(path), os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}; {RELEASE_HINT}")
    return path


def _checked_config(config, source="config") -> dict:
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise TypeError(f"{source}: expected a dict of DiT constructor arguments, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(CONFIG_KEYS)}")
    return dict(config)


def _checked_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA device (or torch was built without "
                             "CUDA); use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _checked_state_dict(contents, path) -> dict:
    if not isinstance(contents, dict):
        kind = type(contents).__name__
        raise CheckpointError(f"{path} is not a DiT state dict: it holds a {kind}, not a dict of tensors")
    if not contents:
        raise CheckpointError(f"{path} is not a DiT state dict: it holds no tensors")
    not_tensors = [key for key, value in contents.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path} is not a DiT state dict: {_names(not_tensors)} are not tensors")
    not_floating = [f"{key} ({value.dtype})" for key, value in contents.items() if not value.dtype.is_floating_point]
    if not_floating:
        raise CheckpointError(f"{path} is not a DiT's weights: {_names(not_floating)} are not floating point")
    for prefix in ("module.", "_orig_mod."):  # saved from a DistributedDataParallel or torch.compile wrapper
        if all(key.startswith(prefix) for key in contents):
            contents = {key.removeprefix(prefix): value for key, value in contents.items()}
    return contents


def _check_matches(model, state_dict, path, arguments) -> None:
    expected = model.state_dict()
    described = ", ".join(f"{key}={value}" for key, value in arguments.items())
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_names(unexpected)}")
        raise CheckpointError(f"{path} does not fit DiT({described}): {'; '.join(problems)}")
    mismatched = [
        f"{key} is {tuple(state_dict[key].shape)}, the model's is {tuple(value.shape)}"
        for key, value in expected.items()
        if state_dict[key].shape != value.shape
    ]
    if mismatched:
        raise CheckpointError(f"{path} does not fit DiT({described}): {_names(mismatched)}")


def _check_finite(model, path) -> None:
    state_dict = model.state_dict()
    if (name := first_nonfinite(state_dict.items())) is not None:
        raise NonFiniteWeightsError(path, name, int((~torch.isfinite(state_dict[name])).sum()))


def _shape(state_dict, key, dims) -> tuple:
    if key not in state_dict:
        raise CheckpointError(f"not a DiT state dict: it has no {key!r} (its keys begin {_names(list(state_dict))})")
    shape = tuple(state_dict[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"not a DiT state dict: {key} has shape {shape}, expected {dims} dimensions")
    return shape


def _block_design(state_dict, hidden_size) -> str:
    """Which of the paper's block designs the tensors of block 0 are."""
    if "blocks.0.cross_attn.q.weight" in state_dict:
        return "cross-attn"
    if "blocks.0.adaLN_modulation.1.weight" not in state_dict:
        return "in-context"
    modulations = _shape(state_dict, "blocks.0.adaLN_modulation.1.weight", 2)[0] // hidden_size
    if modulations not in (4, 6):
        raise CheckpointError(
            f"blocks.0.adaLN_modulation.1.weight: expected {6 * hidden_size} (adaLN-Zero) or {4 * hidden_size} "
            f"(adaLN) output features, got {modulations * hidden_size}"
        )
    return "adaln-zero" if modulations == 6 else "adaln"


def _label_config(rows, given) -> dict:
    """num_classes and class_dropout_prob from the label table's row count (classes + the null row)."""
    if "num_classes" in given:
        has_null_row = rows == given["num_classes"] + 1
    elif "class_dropout_prob" in given:
        has_null_row = given["class_dropout_prob"] > 0
    else:
        has_null_row = True
    return dict(num_classes=rows - has_null_row, class_dropout_prob=RELEASE_CLASS_DROPOUT if has_null_row else 0.0)


def _names(items, shown=5) -> str:
    listed = ", ".join(items[:shown])
    return listed + (f" and {len(items) - shown} more" if len(items) > shown else "")
