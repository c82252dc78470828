"""Bad input fails at the boundary with a message naming the argument."""
import pytest
import torch
from parity import MODEL_TOLERANCE, assert_parity, perturb_

import fastdit
from fastdit import reference


@pytest.fixture(scope="module")
def model():
    return fastdit.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()


def good_inputs(batch=2):
    return torch.randn(batch, 4, 8, 8), torch.tensor([1, 999])[:batch], torch.tensor([0, 10])[:batch]


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda x, t, y: (torch.randn(2, 4, 16, 16), t, y), ValueError, ["x:", "(N, 4, 8, 8)", "(2, 4, 16, 16)"]),
        (lambda x, t, y: (torch.randn(2, 3, 8, 8), t, y), ValueError, ["x:", "(N, 4, 8, 8)", "(2, 3, 8, 8)"]),
        (lambda x, t, y: (torch.randn(4, 8, 8), t, y), ValueError, ["x:", "(4, 8, 8)"]),
        (lambda x, t, y: (x.long(), t, y), TypeError, ["x:", "floating", "int64"]),
        (lambda x, t, y: (x, t, torch.tensor([0, 11])), ValueError, ["y:", "[0, 10]", "11", "null class"]),
        (lambda x, t, y: (x, t, torch.tensor([-1, 3])), ValueError, ["y:", "-1"]),
        (lambda x, t, y: (x, t, torch.tensor([1.0, 2.0])), TypeError, ["y:", "integer", "float32"]),
        (lambda x, t, y: (x, t, torch.tensor([1, 2, 3])), ValueError, ["y:", "(2,)", "(3,)"]),
        (lambda x, t, y: (x, torch.tensor([5]), y), ValueError, ["t:", "(2,)", "(1,)"]),
        (lambda x, t, y: (x, torch.tensor(5), y), ValueError, ["t:", "(2,)", "()"]),
        (lambda x, t, y: (x, t, [1, 2]), TypeError, ["y:", "list"]),
        (lambda x, t, y: (x.numpy(), t, y), TypeError, ["x:", "ndarray"]),
    ],
)
def test_bad_model_inputs(model, change, error, words):
    with pytest.raises(error) as info:
        model(*change(*good_inputs()))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_label_range_without_null_class():
    model = fastdit.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10, class_dropout_prob=0)
    x, t, _ = good_inputs()
    with pytest.raises(ValueError, match=r"y: class labels must lie in \[0, 9\], got 10"):
        model(x, t, torch.tensor([0, 10]))


def test_unknown_model_and_backend_list_the_valid_ones():
    with pytest.raises(ValueError, match="attn_backend: expected one of auto, triton, sdpa"):
        fastdit.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, attn_backend="cudnn")
    with pytest.raises(KeyError, match="unknown model 'DiT-XXL/2'.*DiT-S/2.*DiT-XL/8"):
        fastdit.DiT_models["DiT-XXL/2"]


def test_missing_backend_package_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_flash_attn(name, *args, **kwargs):
        if name.startswith("flash_attn"):
            raise ImportError("No module named 'flash_attn'")
        return real_import(name, *args, **kwargs)

    from fastdit.models import attention

    attention._import_backend.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_flash_attn)
    with pytest.raises(ImportError, match="pip install flash-attn"):
        fastdit.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, attn_backend="flash_attn")
    attention._import_backend.cache_clear()


def test_load_names_missing_and_unexpected_keys_in_one_line(model, tmp_path):
    """fastdit.load checks the keys itself (torch's load_state_dict would list them over many lines)."""
    state = model.state_dict()
    state["blocks.0.attn.extra"] = state.pop("blocks.0.attn.qkv.bias")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(fastdit.CheckpointError) as info:
        fastdit.load(tmp_path / "renamed.pt", config={"num_heads": 2})
    message = str(info.value)
    assert "\n" not in message and "renamed.pt does not fit DiT(" in message, message
    assert "missing keys blocks.0.attn.qkv.bias; unexpected keys blocks.0.attn.extra" in message, message


TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)


@pytest.mark.parametrize("model_class", [reference.DiT, fastdit.DiT], ids=["reference", "fast"])
@pytest.mark.parametrize("change, message", [
    (dict(input_size=0), "input_size: expected an integer >= 1, got 0"),
    (dict(input_size=-8), "input_size: expected an integer >= 1, got -8"),
    (dict(input_size=8.0), "input_size: expected an integer >= 1, got 8.0"),
    (dict(input_size=9), "patch_size: expected a divisor of input_size 9, got 2"),
    (dict(patch_size=0), "patch_size: expected an integer >= 1, got 0"),
    (dict(patch_size=3), "patch_size: expected a divisor of input_size 8, got 3"),
    (dict(in_channels=0), "in_channels: expected an integer >= 1, got 0"),
    (dict(hidden_size=0), "hidden_size: expected an integer >= 1, got 0"),
    (dict(hidden_size=30, num_heads=3), "hidden_size: expected a multiple of 4 (the 2-D sin-cos position "
                                        "embedding), got 30"),
    (dict(num_heads=3), "num_heads: expected a divisor of hidden_size 32, got 3"),
    (dict(num_heads=0), "num_heads: expected an integer >= 1, got 0"),
    (dict(depth=-1), "depth: expected an integer >= 0, got -1"),
    (dict(num_classes=0), "num_classes: expected an integer >= 1, got 0"),
    (dict(num_classes=True), "num_classes: expected an integer >= 1, got True"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob: expected a probability in [0, 1), got 1.0"),
    (dict(class_dropout_prob=-0.1), "class_dropout_prob: expected a probability in [0, 1), got -0.1"),
    (dict(class_dropout_prob=float("nan")), "class_dropout_prob: expected a probability in [0, 1), got nan"),
    (dict(mlp_ratio=0.0), "mlp_ratio: expected a finite number > 0"),
    (dict(mlp_ratio=float("inf")), "mlp_ratio: expected a finite number > 0"),
])
def test_bad_constructor_arguments_are_named(model_class, change, message):
    with pytest.raises(ValueError) as info:
        model_class(**{**TINY, **change})
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("model_class", [reference.DiT, fastdit.DiT], ids=["reference", "fast"])
def test_edge_constructor_arguments_still_build(model_class):
    """The limits themselves are valid: no blocks, no class dropout, one class, one head, patch = input."""
    model = model_class(**{**TINY, "depth": 0, "class_dropout_prob": 0.0, "num_classes": 1, "num_heads": 1,
                           "patch_size": 8})
    assert len(model.blocks) == 0 and model.y_embedder.embedding_table.num_embeddings == 1


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_integer_labels_get_a_clear_error(model, dtype):
    """The embedding lookup takes int64 or int32 indices only: the fast model says so (with the fix) instead of
    torch's "indices ... ByteTensor" error, which the reference, unchecked like the release, still gives."""
    x, t, _ = good_inputs()
    y = torch.tensor([0, 3], dtype=dtype)
    with pytest.raises(TypeError, match=rf"^y: expected integer class labels of dtype torch.int64 or torch.int32, "
                                        rf"got dtype {dtype} \(convert them with .long\(\)\)$"):
        model(x, t, y)
    ref = reference.DiT(**TINY).eval()
    with pytest.raises(RuntimeError, match="indices"):
        ref(x, t, y)


def test_int32_labels_give_the_int64_result_in_both_models():
    ref = perturb_(reference.DiT(**TINY).eval())  # perturbed: a fresh adaLN-Zero model outputs zeros
    fast = fastdit.DiT(**TINY).eval()
    fast.load_state_dict(ref.state_dict())
    x, t, y = good_inputs()
    with torch.no_grad():
        for net in (ref, fast):
            assert torch.equal(net(x, t, y.int()), net(x, t, y))
        assert_parity(fast(x, t, y.int()), ref(x, t, y), MODEL_TOLERANCE[torch.float32], "int32 labels")


@pytest.mark.parametrize("labels, bad", [([-1, 3], -1), ([0, 11], 11)])
def test_int32_labels_are_range_checked(model, labels, bad):
    x, t, _ = good_inputs()
    with pytest.raises(ValueError, match=rf"^y: class labels must lie in \[0, 10\] .*got {bad}$"):
        model(x, t, torch.tensor(labels, dtype=torch.int32))


@pytest.mark.parametrize("name", ["x", "t", "y"])
def test_an_input_on_another_device_is_named(model, name):
    inputs = dict(zip("xty", good_inputs()))
    inputs[name] = inputs[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}: expected a tensor on the model's device cpu, got one on meta "):
        model(**inputs)


def test_inputs_off_a_meta_model_are_named():
    with torch.device("meta"):
        meta_model = fastdit.DiT(**TINY).eval()
    with pytest.raises(ValueError, match=r"^x: expected a tensor on the model's device meta, got one on cpu "):
        meta_model(*good_inputs())
