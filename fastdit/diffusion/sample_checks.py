"""What ``sampling.sample`` checks: its arguments before any work (one line each, naming the argument), and
its output after it, where non-finite samples are an error that names their cause."""
import itertools

import numpy as np
import torch

from fastdit.diffusion.denoising import run_eager
from fastdit.models.validation import check_class_ids, first_nonfinite


def check_int(name, value, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_labels(class_labels, num_classes, device):
    """class_labels as int64 on ``device``: a tensor, a numpy array or a sequence of int class ids."""
    if isinstance(class_labels, (str, bytes)) or not hasattr(class_labels, "__len__"):
        raise TypeError(f"class_labels must be a sequence of int class ids (a list, numpy array or tensor), got "
                        f"{type(class_labels).__name__} {class_labels!r:.40}")
    if len(class_labels) == 0:
        raise ValueError("class_labels must be a non-empty 1-D list of class ids, got an empty one")
    if isinstance(class_labels, torch.Tensor):
        labels = class_labels
    else:
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            huge = [label for label in class_labels if isinstance(label, int) and not -2**63 <= label < 2**63]
            if huge:
                raise ValueError(f"class_labels: class ids must be in [0, {num_classes - 1}] (the model has "
                                 f"{num_classes} classes), got {huge[0]}") from None
            raise TypeError(f"class_labels must be int class ids, got {class_labels!r:.60} ({error})") from None
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"class_labels must be integers, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"class_labels must be a non-empty 1-D list of class ids, got shape {tuple(labels.shape)}")
    if labels.device.type == "meta":
        raise ValueError("class_labels: got a tensor on the meta device, which holds no values")
    check_class_ids(labels, num_classes, "class_labels")
    return labels.to(device=device, dtype=torch.long)


class NonFiniteSampleError(ValueError):
    """Sampling gave NaN or infinite values (a ValueError: the model or the settings are what is wrong)."""


def nonfinite_cause(model, denoiser, solver, start, cache=None) -> str:
    """Why a call's samples are not finite: non-finite weights, else the first step that went wrong, found by
    running the steps again eagerly with a check after each (only on this failure path)."""
    if (name := first_nonfinite(itertools.chain(model.named_parameters(), model.named_buffers()))) is not None:
        return f"the model's weights are not finite ({name} holds NaN or inf)"
    image_noise, x_T = start()
    if not bool(torch.isfinite(x_T).all()):
        return "the initial noise is not finite (the noise argument holds NaN or inf)"
    found = []

    def stop(i, eps, x):
        where = f"step {i + 1} of {len(solver)} (timestep {int(solver.timesteps[i])})"
        if not bool(torch.isfinite(eps).all()):
            found.append(f"the model's output is not finite from {where} on, in {denoiser.dtype}")
        elif not bool(torch.isfinite(x).all()):
            found.append(f"the {solver.name} update is not finite from {where} on")
        return bool(found)

    run_eager(denoiser, solver, image_noise, x_T, lambda steps: steps, stop, cache)
    return found[0] if found else "a rerun of the steps was finite: the sampling is not deterministic here"
