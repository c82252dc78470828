"""Every adaLN modulation of the model in one GEMM.

Each adaLN block regresses its (shift, scale, gate) vectors from the same SiLU(c), and so does the
final layer. Stacked, their weights are one (rows, D) matrix: one GEMM gives every modulation of
the forward in one launch instead of depth + 1 (at batch 1, where each is a tiny weight-bound GEMM,
the launches are most of their cost).

The model owns that matrix and its bias as two parameters (``modulation_weight``,
``modulation_bias``); each block's ``adaLN_modulation[1]`` is a ``ModulationRows``, a live view of
its rows, so the release's module paths still reach the weights. The state dict keeps the
release's keys: saving splits the matrix into ``blocks.{i}.adaLN_modulation.1.weight`` and
``final_layer.adaLN_modulation.1.weight`` (and biases), in the release's order; loading
concatenates them back. An optimizer state saved for the release's parameter list (each layer's adaLN
weight and bias a parameter of its own, as fastdit's model had them before they were stacked) is joined
the same way (``stacked_optimizer_state``). Two parameters rather than 2 (depth + 1) views of one
storage: a view shares its storage only until ``.to()``, ``copy.deepcopy`` (the EMA) or ``load_state_dict(assign=True)``
replaces it, after which a GEMM on the stale storage would silently compute with old weights.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT, BIAS = "modulation_weight", "modulation_bias"
# FASTDIT_ONE_ADALN_GEMM=0 computes each block's modulation with its own GEMM (depth + 1 launches,
# as before), on the same parameters: the benchmarks' switch for measuring what the one GEMM gains.
ONE_GEMM = os.environ.get("FASTDIT_ONE_ADALN_GEMM", "1") != "0"


class ModulationRows(nn.Module):
    """A block's (or the final layer's) adaLN linear: rows ``start:stop`` of its model's stacked weight."""

    def __init__(self, model, start, stop, in_features):
        super().__init__()
        # A plain attribute, not a submodule (the model contains this module): copy.deepcopy maps it
        # to the copy's model, so an EMA copy's views read the copy's weights.
        object.__setattr__(self, "model", model)
        self.start, self.stop, self.in_features, self.out_features = start, stop, in_features, stop - start

    @property
    def weight(self):
        return getattr(self.model, WEIGHT)[self.start:self.stop]

    @property
    def bias(self):
        return getattr(self.model, BIAS)[self.start:self.stop]

    def forward(self, silu_c):
        return F.linear(silu_c, self.weight, self.bias)

    def extra_repr(self):
        return f"rows {self.start}:{self.stop} of the model's {WEIGHT}, in_features={self.in_features}"


def stack_modulations(model, layers):
    """Move the adaLN linears of ``layers`` (the blocks, then the final layer) into two parameters of
    ``model`` and put a ``ModulationRows`` in each linear's place."""
    linears = [layer.adaLN_modulation[1] for layer in layers]
    model.register_parameter(WEIGHT, nn.Parameter(torch.cat([linear.weight.detach() for linear in linears])))
    model.register_parameter(BIAS, nn.Parameter(torch.cat([linear.bias.detach() for linear in linears])))
    start = 0
    for layer, linear in zip(layers, linears):
        layer.adaLN_modulation[1] = ModulationRows(model, start, start + linear.out_features, linear.in_features)
        start += linear.out_features
    model._register_state_dict_hook(_split_into_release_keys)
    model._register_load_state_dict_pre_hook(_join_release_keys, with_module=True)
    model.register_load_state_dict_post_hook(_name_release_keys)


def modulations(model, layers, silu_c):
    """Each layer's modulation output (N, rows of that layer), from one GEMM (or one per layer when
    FASTDIT_ONE_ADALN_GEMM=0)."""
    rows = [layer.adaLN_modulation[1] for layer in layers]
    if not ONE_GEMM:
        return [linear(silu_c) for linear in rows]
    stacked = F.linear(silu_c, getattr(model, WEIGHT), getattr(model, BIAS))
    return stacked.split([linear.out_features for linear in rows], dim=1)


def _release_keys(model, prefix):
    """{release key prefix (".weight"/".bias" to add): its ModulationRows}, in the model's module order."""
    return {f"{prefix}{name}.": module for name, module in model.named_modules()
            if isinstance(module, ModulationRows)}


def _split_into_release_keys(model, state_dict, prefix, local_metadata):
    split_into_release_keys(model, state_dict, prefix)


def split_into_release_keys(model, tensors, prefix=""):
    """Replace the stacked adaLN tensors in ``tensors``, a dict named as ``model.named_parameters()`` or its
    state dict (its gradients, say), by each layer's, under the release's keys and in its order."""
    weight, bias = tensors.pop(prefix + WEIGHT), tensors.pop(prefix + BIAS)
    # Copies, not views: safetensors refuses tensors that share storage, and a view would pin the
    # whole matrix behind every key.
    layers = {key: (weight[rows.start:rows.stop].detach().clone(), bias[rows.start:rows.stop].detach().clone())
              for key, rows in _release_keys(model, prefix).items()}
    # The release's order: each adaLN linear's keys after the last other key of its block (its MLP)
    # or of the final layer (its decoder).
    entries = list(tensors.items())
    last = {release: index for index, (key, _) in enumerate(entries) for release in layers
            if key.startswith(release.split("adaLN_modulation")[0])}
    tensors.clear()
    for index, (key, value) in enumerate(entries):
        tensors[key] = value
        for release in [release for release, at in last.items() if at == index]:
            tensors[release + "weight"], tensors[release + "bias"] = layers.pop(release)
    for release, (layer_weight, layer_bias) in layers.items():
        tensors[release + "weight"], tensors[release + "bias"] = layer_weight, layer_bias


def _join_release_keys(model, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    if prefix + WEIGHT in state_dict:  # a state dict of the stacked parameters themselves
        return
    layers = _release_keys(model, prefix)
    weights, biases = [], []
    for release, rows in layers.items():
        for name, parts, shape in (("weight", weights, (rows.out_features, rows.in_features)),
                                   ("bias", biases, (rows.out_features,))):
            value = state_dict.get(release + name)
            if value is None:
                return  # reported by the post hook under the release's name
            if tuple(value.shape) != shape:
                error_msgs.append(f"size mismatch for {release}{name}: copying a param with shape "
                                  f"{tuple(value.shape)} from checkpoint, the shape in current model is {shape}.")
                return
            parts.append(value)
    for release in layers:
        del state_dict[release + "weight"], state_dict[release + "bias"]
    state_dict[prefix + WEIGHT], state_dict[prefix + BIAS] = torch.cat(weights), torch.cat(biases)


def _name_release_keys(model, incompatible_keys):
    """A checkpoint without some adaLN key is reported under the release's key names, not the stacked ones."""
    missing = incompatible_keys.missing_keys
    stacked = [key for key in missing if key.endswith(WEIGHT) or key.endswith(BIAS)]
    if not stacked:
        return
    prefix = stacked[0][: -len(WEIGHT)] if stacked[0].endswith(WEIGHT) else stacked[0][: -len(BIAS)]
    present = set(incompatible_keys.unexpected_keys)
    for key in stacked:
        missing.remove(key)
    for release in _release_keys(model, prefix):
        for name in ("weight", "bias"):
            if release + name in present:
                incompatible_keys.unexpected_keys.remove(release + name)
            else:
                missing.append(release + name)


def release_parameter_names(model) -> list[str]:
    """``model``'s parameter names as the release's model lists them: each layer's adaLN weight and bias,
    under the release's keys and in its order, in place of the stacked pair."""
    names = {name: parameter.detach().to("meta") for name, parameter in model.named_parameters()}
    if WEIGHT in names:
        split_into_release_keys(model, names)
    return list(names)


def stacked_optimizer_state(model, state: dict) -> dict:
    """``state``, a one-group optimizer state dict, for ``model``'s parameter list: as it is when it was saved
    for that list, joined when it was saved for the release's (``release_parameter_names``). A stacked
    parameter's per-element state (Adam's moments) is its layers' concatenated in the order of their rows;
    its per-parameter state (Adam's step) is the first layer's, as the layers were stepped together."""
    names = [name for name, _ in model.named_parameters()]
    release = release_parameter_names(model)
    (group,) = state["param_groups"]
    if len(group["params"]) == len(names):
        return state
    if len(group["params"]) != len(release):
        per_layer = f" ({len(release)} with each adaLN layer's weight and bias its own)" if release != names else ""
        raise ValueError(f"the optimizer state holds {len(group['params'])} parameters, the model has "
                         f"{len(names)}{per_layer}")
    saved = {name: state["state"].get(index) for name, index in zip(release, group["params"])}
    layers = sorted(_release_keys(model, "").items(), key=lambda item: item[1].start)
    for name, part in ((WEIGHT, "weight"), (BIAS, "bias")):
        per_layer = [saved.pop(release_key + part) for release_key, _ in layers]
        saved[name] = None if per_layer[0] is None else {
            key: torch.cat([layer[key] for layer in per_layer]) if torch.is_tensor(value) and value.dim() else value
            for key, value in per_layer[0].items()}
    joined = {index: saved[name] for index, name in enumerate(names) if saved[name] is not None}
    return {"state": joined, "param_groups": [{**group, "params": list(range(len(names)))}]}
