"""Checks of what users pass to the model, so that bad input fails at the boundary with a
message that names the argument, what was expected and what came, instead of deep in a
kernel or, worse, as a silent wrong answer."""
import torch


def _is_tracing() -> bool:
    # Value checks need the labels on the host: skip them while torch.compile traces or a
    # CUDA graph captures (shapes and dtypes are still checked, at trace time).
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# What nn.Embedding takes as indices.
LABEL_DTYPES = (torch.int64, torch.int32)


def check_labels(y: torch.Tensor, num_classes: int, allow_null: bool, name: str = "y") -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected an integer tensor of class labels, got {type(y).__name__}")
    if y.dtype not in LABEL_DTYPES:
        # uint8, int8 and int16 labels too: the embedding lookup takes only these two, and converting here
        # would copy the labels in every forward for a caller that can convert once.
        raise TypeError(f"{name}: expected integer class labels of dtype torch.int64 or torch.int32, got dtype "
                        f"{y.dtype}" + (" (convert them with .long())" if not y.dtype.is_floating_point else ""))
    if _is_tracing() or y.numel() == 0:
        return
    high = num_classes if allow_null else num_classes - 1
    null = f" (index {num_classes} is the null class)" if allow_null else ""
    message = f"{name}: class labels must lie in [0, {high}]{null}"
    if y.device.type != "cpu":
        # Reading device labels back would make the host wait for the device in every forward, so in
        # every sampling and training step: the device checks them itself, without a sync. On CUDA a
        # bad label then fails as a device-side assertion (as the embedding lookup would), and the
        # message is lost; ``fastdit.sample`` checks its labels on the host once per call.
        check_label_range_async(y, high, message)
        return
    bad = labels_outside(y, high)  # on the CPU: no device to wait for
    if bad:
        raise ValueError(f"{message}, got {bad[0] if bad[0] < 0 else bad[-1]}")


def labels_outside(labels: torch.Tensor, high: int) -> list[int]:
    """The distinct labels of the host tensor ``labels`` outside [0, high], sorted."""
    return sorted(set(labels[(labels < 0) | (labels > high)].tolist()))


def check_class_ids(labels: torch.Tensor, num_classes: int, name: str) -> None:
    """The class ids a user asks to sample (host ``labels``): every id outside the model's classes, named."""
    bad = labels_outside(labels, num_classes - 1)
    if bad:
        raise ValueError(f"{name}: class ids must be in [0, {num_classes - 1}] (the model has {num_classes} "
                         f"classes), got {bad}")


def check_label_range_async(y: torch.Tensor, high: int, message: str) -> None:
    """Fail with ``message`` when a label of ``y`` is outside [0, high], asynchronously on a device."""
    torch._assert_async(((y >= 0) & (y <= high)).all(), message)


def check_model_inputs(model, x, t, y) -> None:
    """Validate ``model(x, t, y)`` for a DiT with ``model.in_channels`` and ``model.input_size``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor of shape (N, C, H, W), got {type(x).__name__}")
    expected = f"(N, {model.in_channels}, {model.input_size}, {model.input_size})"
    if x.dim() != 4 or tuple(x.shape[1:]) != (model.in_channels, model.input_size, model.input_size):
        raise ValueError(f"x: expected shape {expected}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    batch = x.shape[0]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected a tensor of {batch} timesteps, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"t: expected shape ({batch},), one timestep per image in x, got {tuple(t.shape)}")
    if isinstance(y, torch.Tensor) and (y.dim() != 1 or y.shape[0] != batch):
        raise ValueError(f"y: expected shape ({batch},), one class label per image in x, got {tuple(y.shape)}")
    check_devices(model.pos_embed.device, x=x, t=t, y=y)
    check_labels(y, model.num_classes, allow_null=model.y_embedder.dropout_prob > 0)


def check_devices(weights: torch.device, **inputs) -> None:
    """Every tensor input on the device of the model's ``weights``: a mismatch (a meta tensor among them
    too) otherwise fails deep in a kernel, or on the meta device not at all. Compares metadata only: no
    sync. Inputs that are not tensors are left to the checks that name their type."""
    for name, tensor in inputs.items():
        if isinstance(tensor, torch.Tensor) and tensor.device != weights:
            raise ValueError(f"{name}: expected a tensor on the model's device {weights}, got one on {tensor.device} "
                             f"(move the inputs with .to({str(weights)!r}), or the model)")


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first floating-point tensor of ``(name, tensor)`` pairs holding a NaN or an infinity,
    or None; one host sync."""
    named_tensors = [(name, tensor) for name, tensor in named_tensors if tensor.is_floating_point()]
    if not named_tensors:
        return None
    # AdamW keeps its step counters on the CPU beside moments on the GPU: one device for the stack.
    device = named_tensors[0][1].device
    finite = torch.stack([tensor.isfinite().all().to(device) for _, tensor in named_tensors])
    if bool(finite.all()):
        return None
    return named_tensors[int((~finite).nonzero()[0])][0]
