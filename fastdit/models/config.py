"""What a DiT's weights are described by, for the checkpoint readers and writers (``checkpoint.py``) and the
other libraries' formats (``fastdit.integrations``) alike: the constructor arguments a checkpoint stores, a
model's own, and the errors of reading them. It imports no reader, so both sides build on it."""
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


class NonFiniteWeightsError(CheckpointError):
    """Weights holding NaN or inf: ``name`` is the first such tensor, ``count`` its NaN and inf values."""

    def __init__(self, path, name: str, count: int):
        self.name, self.count = name, count
        super().__init__(f"{path}: the weights are not finite: {name} holds {count} NaN or inf values (first bad "
                         "tensor; e.g. a diverged training run); pass allow_nonfinite=True to load them")


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
