"""Launch configurations chosen per GPU.

Each launcher offers a short list of candidate configurations (constexpr block sizes plus
``num_warps`` and ``num_stages``) for one launch, the first being its default, and a
``launch(config)`` function that runs the kernel with one of them and returns Triton's
compiled kernel. ``choose`` picks among them:

- interpreted (``TRITON_INTERPRET=1``), or with ``FASTDIT_AUTOTUNE=0``: the default, so that
  results are deterministic and tests see one configuration;
- on a GPU, at the first launch of a (GPU, kernel, shape class) key: every candidate is
  compiled and run once, those that spill registers or do not fit the GPU's shared memory
  are pruned (the static check of ``python -m fastdit.tools.aot``, applied on the device),
  the rest are timed with ``triton.testing.do_bench`` and the fastest is kept in a per-process
  cache (and in ``$FASTDIT_TUNING_CACHE``, a JSON file, when that is set). While a CUDA graph
  is being captured nothing is timed: a key seen for the first time there gets the default;
- under ``runtime.simulate`` (the AOT check): every candidate is launched, so that the
  recorder compiles each, and the default's result is returned.

``python -m fastdit.tools.tune`` (fastdit/tools/tune.py) tunes the launches of a forward and backward of
each fast model on this GPU and writes what it chose (docs/tuning.md).

Launches are pure (they overwrite their outputs), so running a candidate more than once
leaves the same result as running the chosen one.
"""
import contextvars
import json
import os
import tempfile
import threading
from typing import Any, Callable

import torch

from .runtime import TRITON_INTERPRET, gpu_spec, simulated

Config = dict[str, Any]

# (kernel, candidate index, is default) of the launch in progress while simulating.
_candidate: contextvars.ContextVar[tuple[str, int, bool] | None] = contextvars.ContextVar("candidate", default=None)
_lock = threading.Lock()
_chosen: dict[str, Config] = {}
_report: dict[str, dict] = {}


def current_candidate() -> tuple[str, int, bool] | None:
    """(kernel, index, is_default) of the candidate being launched under ``runtime.simulate``."""
    return _candidate.get()


def tuning_enabled() -> bool:
    return not TRITON_INTERPRET and os.environ.get("FASTDIT_AUTOTUNE", "1") != "0"


def choose(kernel: str, key: tuple, candidates: list[Config], launch: Callable[[Config], Any],
           device: torch.device) -> Config:
    """Run ``launch`` with the configuration to use for this launch and return that configuration."""
    if not candidates:
        raise ValueError(f"{kernel}: no candidate launch configurations")
    if simulated() is not None:
        for index, config in reversed(list(enumerate(candidates))):  # the default runs last
            token = _candidate.set((kernel, index, index == 0))
            try:
                launch(config)
            finally:
                _candidate.reset(token)
        return candidates[0]
    if len(candidates) == 1 or not tuning_enabled() or device.type != "cuda":
        launch(candidates[0])
        return candidates[0]
    cache_key = _cache_key(kernel, key, device)
    config = _chosen.get(cache_key) or _stored(cache_key)
    if config is None:
        if torch.cuda.is_current_stream_capturing():
            config = candidates[0]
        else:
            config = _tune(cache_key, candidates, launch, device)
    launch(config)
    return config


def _cache_key(kernel: str, key: tuple, device: torch.device) -> str:
    return json.dumps([gpu_spec(device).name, kernel, *map(str, key)])


def _tune(cache_key: str, candidates: list[Config], launch, device) -> Config:
    from triton.testing import do_bench

    spec = gpu_spec(device)
    results = []
    for config in candidates:
        try:
            compiled = launch(config)
        except Exception as error:  # noqa: BLE001 -- triton's OutOfResources and compile errors prune a candidate
            results.append({"config": config, "pruned": f"{type(error).__name__}: {error}".splitlines()[0]})
            continue
        # Triton 3.6-3.9 set n_spills when the first launch loads the kernel (CompiledKernel._init_handles).
        spills, shared = getattr(compiled, "n_spills", 0), compiled.metadata.shared
        if spills or shared > spec.shared_memory:
            results.append({"config": config, "pruned": f"{spills} spills, {shared} B shared memory"})
            continue
        results.append({"config": config, "ms": do_bench(lambda: launch(config), warmup=5, rep=20)})
    timed = [result for result in results if "ms" in result]
    chosen = min(timed, key=lambda result: result["ms"])["config"] if timed else candidates[0]
    with _lock:
        _chosen[cache_key] = chosen
        _report[cache_key] = {"chosen": chosen, "candidates": results}
        _persist()
    return chosen


def _cache_file() -> str | None:
    return os.environ.get("FASTDIT_TUNING_CACHE") or None


def _stored(cache_key: str) -> Config | None:
    path = _cache_file()
    if path is None or not os.path.exists(path):
        return None
    with open(path) as file:
        entry = json.load(file).get(cache_key)
    if entry is not None:
        _chosen[cache_key] = entry["chosen"]
        return entry["chosen"]
    return None


def _persist() -> None:
    """Merge this process's choices into the cache file, written atomically."""
    path = _cache_file()
    if path is None:
        return
    stored = {}
    if os.path.exists(path):
        with open(path) as file:
            stored = json.load(file)
    stored.update(_report)
    write_json(path, stored)


def write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as file:
        json.dump(data, file, indent=1, sort_keys=True)
    os.replace(file.name, path)


def report() -> dict[str, dict]:
    """Every choice this process made by timing: {key: {"chosen": config, "candidates": [...]}}."""
    with _lock:
        return dict(_report)
