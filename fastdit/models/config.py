"""What a DiT's weights are described by, for the checkpoint readers and writers (``checkpoint.py``) and the
other libraries' formats (``fastdit.integrations``) alike: the constructor arguments a checkpoint stores, a
model's own, and the errors of reading them. It imports no reader, so both sides build on it."""
import json
import pickle

from fastdit import reference

CONFIG_KEYS = (
    "input_size", "patch_size", "in_channels", "hidden_size", "depth",
    "num_heads", "mlp_ratio", "class_dropout_prob", "num_classes", "learn_sigma", "block",
)
PAPER_NUM_HEADS = {config["hidden_size"]: config["num_heads"] for config in reference.DIT_CONFIGS.values()}
# Every model trained with the release's code has class dropout 0.1, hence a null-class row.
RELEASE_CLASS_DROPOUT = 0.1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not the weights of a DiT."""


class MissingNumHeadsError(CheckpointError):
    """Weights that store no config, of a width (``hidden_size``) whose number of heads the paper does not give."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        super().__init__(f"num_heads cannot be read from the tensors and hidden_size {hidden_size} is not one of the "
                         f"paper's widths ({', '.join(map(str, PAPER_NUM_HEADS))}): pass it, e.g. "
                         "config={'num_heads': ...}")


class NonFiniteWeightsError(CheckpointError):
    """Weights holding NaN or inf: ``name`` is the first such tensor, ``count`` its NaN and inf values."""

    def __init__(self, path, name: str, count: int):
        self.name, self.count = name, count
        super().__init__(f"{path}: the weights are not finite: {name} holds {count} NaN or inf values (first bad "
                         "tensor; e.g. a diverged training run); pass allow_nonfinite=True to load them")


def read_json_object(path, required=True) -> dict | None:
    """The JSON object in ``path`` (a config, an index); a file that cannot be read or holds another JSON value
    is a ``CheckpointError`` naming it, or None where it is not ``required``."""
    try:
        with open(path) as file:
            contents = json.load(file)
    except (OSError, ValueError) as error:
        if not required:
            return None
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(contents, dict):
        if not required:
            return None
        raise CheckpointError(f"{path}: expected a JSON object, got {type(contents).__name__}")
    return contents


def load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in fastdit's words: torch's own message advises
    loading with ``weights_only=False``, which would run the code a pickle carries."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than tensors (a pickle that could run code), which fastdit never loads"
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def model_config(model) -> dict:
    """The constructor arguments of a DiT (fast or reference), without ``attn_backend``: that is
    a choice of the machine that runs the model, not a property of its weights."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model
    if not isinstance(model, reference.DiT):  # fastdit.DiT is one too
        raise TypeError(f"model: expected a fastdit.DiT or fastdit.reference.DiT, got {type(model).__name__}")
    hidden_size = model.pos_embed.shape[-1]
    return dict(
        input_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        hidden_size=hidden_size,
        depth=len(model.blocks),
        num_heads=model.num_heads,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / hidden_size if len(model.blocks) else 4.0,
        class_dropout_prob=model.y_embedder.dropout_prob,
        num_classes=model.num_classes,
        learn_sigma=model.learn_sigma,
        block=model.block,
    )
