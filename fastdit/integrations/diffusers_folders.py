"""diffusers' folders on disk: read a DiT from a pipeline root or a transformer folder, write a
transformer folder that ``DiTTransformer2DModel.from_pretrained`` loads.

A pipeline root (facebook/DiT-XL-2-256's layout) has ``model_index.json`` and the components in
sub-folders: ``transformer/``, ``vae/``, ``scheduler/``. A transformer folder has ``config.json``
and the weights, as diffusers names them: ``diffusion_pytorch_model.safetensors``, sharded
(``...safetensors.index.json`` listing the shards), pickled (``.bin``, read with
``torch.load(weights_only=True)``), or a variant such as ``diffusion_pytorch_model.fp16.safetensors``.
No diffusers import: the files are JSON and safetensors.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastdit.integrations.diffusers_convert import (
    DIFFUSERS_CLASS,
    LEGACY_CLASS,
    diffusers_to_release,
    release_to_diffusers,
)
from fastdit.io import atomic_path, write_text_atomic
from fastdit.models.config import CONFIG_KEYS, CheckpointError, load_failure, model_config, read_json_object

MODEL_INDEX = "model_index.json"
CONFIG_FILE = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"
# fastdit.integrations.diffusers' pipeline transformer: its folders hold fastdit's config and the
# release's keys under "model." (the DiT it wraps), so fastdit reads them too.
WRAPPER_CLASS = "FastDiTTransformer2DModel"
WRAPPER_PREFIX = "model."
TRANSFORMER_CLASSES = (DIFFUSERS_CLASS, LEGACY_CLASS, WRAPPER_CLASS)
# The diffusers version whose format write_diffusers writes (the tests load it with the installed one).
WRITTEN_DIFFUSERS_VERSION = "0.42.1"
# Weight files in the order diffusers prefers them; a variant goes before the last extension.
WEIGHT_FILES = (f"{WEIGHTS_NAME}.safetensors", f"{WEIGHTS_NAME}.safetensors.index.json",
                f"{WEIGHTS_NAME}.bin", f"{WEIGHTS_NAME}.bin.index.json")
DEFAULT_VARIANTS = (None, "fp16")  # full precision first


def is_diffusers_folder(path) -> bool:
    """Whether ``path`` is a diffusers pipeline root or a DiT transformer folder (never raises)."""
    try:
        path = os.fspath(path)
    except TypeError:
        return False
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, MODEL_INDEX)):
        return True
    config = read_json_object(os.path.join(path, CONFIG_FILE), required=False)
    return isinstance(config, dict) and config.get("_class_name") in TRANSFORMER_CLASSES


def vae_folder(root) -> str | None:
    """A pipeline root's ``vae/`` (with its config.json), or None: a transformer folder has no VAE."""
    root = os.fspath(root)
    folder = os.path.join(root, "vae")
    has_vae = os.path.isfile(os.path.join(root, MODEL_INDEX)) and os.path.isfile(os.path.join(folder, CONFIG_FILE))
    return folder if has_vae else None


def transformer_folder(path) -> str:
    """The folder holding the DiT: ``path/transformer`` for a pipeline root, else ``path`` itself."""
    path = os.fspath(path)
    index_path = os.path.join(path, MODEL_INDEX)
    if not os.path.isfile(index_path):
        return path
    index = read_json_object(index_path)
    if "transformer" not in index:
        components = ", ".join(key for key in index if not key.startswith("_"))
        raise CheckpointError(f"{index_path} names no transformer (its components: {components}); a DiT pipeline "
                              f"has transformer, vae and scheduler")
    return os.path.join(path, "transformer")


def read_diffusers(path, variant: str | None = None) -> tuple[dict, dict]:
    """(the release's state dict on the CPU, fastdit's config) from a diffusers pipeline root or
    transformer folder. ``variant`` ("fp16") picks diffusers' variant files; None reads the
    full-precision files, or the fp16 variant when they are absent. Conversion is strict."""
    folder = transformer_folder(path)
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder} is not a diffusers transformer folder: it has no {CONFIG_FILE}")
    config = read_json_object(config_path)
    class_name = config.get("_class_name")
    if class_name not in TRANSFORMER_CLASSES:
        raise CheckpointError(f"{config_path}: _class_name is {class_name!r}; fastdit reads a DiT "
                              f"({', '.join(TRANSFORMER_CLASSES)})")
    state_dict = _read_weights(folder, variant)
    if class_name == WRAPPER_CLASS:
        return _unwrapped(state_dict, config, config_path)
    return diffusers_to_release(state_dict, config, source=folder)


def write_diffusers(model, directory) -> None:
    """Write ``directory/config.json`` and ``directory/diffusion_pytorch_model.safetensors`` (each
    atomically; the directory is created if needed): a transformer folder that diffusers'
    ``DiTTransformer2DModel.from_pretrained`` loads with no missing or unexpected keys. Its
    ``norm_eps`` is the release's 1e-6; diffusers' timestep embedding still differs (docs/diffusers.md)."""
    config = model_config(model)
    model = getattr(model, "_orig_mod", model)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    tensors, diffusers_config = release_to_diffusers(state_dict, config)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, f"{WEIGHTS_NAME}.safetensors")) as temporary:
        save_file(tensors, temporary, metadata={"format": "pt"})
    header = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": WRITTEN_DIFFUSERS_VERSION}
    write_text_atomic(os.path.join(directory, CONFIG_FILE), json.dumps({**header, **diffusers_config}, indent=2) + "\n")


# --- weights --------------------------------------------------------------------------------


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' variant naming: the variant goes before the last extension (x.safetensors -> x.fp16.safetensors)."""
    if variant is None:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _read_weights(folder, variant) -> dict:
    variants = DEFAULT_VARIANTS if variant is None else (variant,)
    names = [with_variant(name, each) for each in variants for name in WEIGHT_FILES]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _read_index(folder, path) if name.endswith(".json") else _read_file(path)
    raise CheckpointError(f"{folder} holds no diffusers weights: none of {', '.join(names)}")


def _read_index(folder, index_path) -> dict:
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected a \"weight_map\" of tensor names to shard files")
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in {folder}")
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path} lists {shard}, which is not in {folder} (an incomplete download?)")
        contents = _read_file(shard_path)
        expected = {key for key, file in weight_map.items() if file == shard}
        if set(contents) != expected:
            raise CheckpointError(f"{shard_path} does not hold the tensors {os.path.basename(index_path)} lists "
                                  f"for it ({len(contents)} tensors, {len(expected)} listed)")
        state_dict.update(contents)
    return state_dict


def _read_file(path) -> dict:
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt", device="cpu") as file:
                contents = {key: file.get_tensor(key) for key in file.keys()}
        else:
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {load_failure(error)}") from None
    if not isinstance(contents, dict) or not all(isinstance(value, torch.Tensor) for value in contents.values()):
        raise CheckpointError(f"{path} is not a state dict: it holds a {type(contents).__name__}, not only tensors")
    return contents


def _unwrapped(state_dict, config, config_path) -> tuple[dict, dict]:
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"{config_path}: a {WRAPPER_CLASS} config needs {', '.join(missing)}")
    outside = [key for key in state_dict if not key.startswith(WRAPPER_PREFIX)]
    if outside:
        raise CheckpointError(f"{config_path}: the {WRAPPER_CLASS} weights hold keys outside its DiT: "
                              f"{', '.join(outside[:5])}")
    unwrapped = {key.removeprefix(WRAPPER_PREFIX): value for key, value in state_dict.items()}
    return unwrapped, {key: config[key] for key in CONFIG_KEYS}

