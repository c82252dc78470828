"""Bad input fails at the boundary with a message naming the argument."""
import pytest
import torch

import fastdit


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


def test_input_size_must_fit_patch():
    with pytest.raises(ValueError, match="input_size"):
        fastdit.DiT(input_size=9, patch_size=2, hidden_size=32, depth=1, num_heads=2)
