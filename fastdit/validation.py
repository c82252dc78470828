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


def check_labels(y: torch.Tensor, num_classes: int, allow_null: bool, name: str = "y") -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected an integer tensor of class labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class labels (torch.long), got dtype {y.dtype}")
    if _is_tracing() or y.numel() == 0:
        return
    high = num_classes if allow_null else num_classes - 1
    low_seen, high_seen = torch.stack(torch.aminmax(y)).tolist()  # one device sync, not two
    if low_seen < 0 or high_seen > high:
        null = f" (index {num_classes} is the null class)" if allow_null else ""
        bad = low_seen if low_seen < 0 else high_seen
        raise ValueError(f"{name}: class labels must lie in [0, {high}]{null}, got {bad}")


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
    check_labels(y, model.num_classes, allow_null=model.y_embedder.dropout_prob > 0)
