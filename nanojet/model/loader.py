"""safetensors checkpoints (single file or sharded) <-> nanojet modules; the HF name mapping is data."""
import json
from pathlib import Path

import torch
from torch import nn

# HF tensor name (after the layer prefix) -> (nanojet parameter, shard of a fused parameter or None).
LAYER_NAMES: dict[str, tuple[str, int | None]] = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "self_attn.q_proj.bias": ("self_attn.qkv_proj.bias", 0),
    "self_attn.k_proj.bias": ("self_attn.qkv_proj.bias", 1),
    "self_attn.v_proj.bias": ("self_attn.qkv_proj.bias", 2),
    "self_attn.o_proj.weight": ("self_attn.o_proj.weight", None),
    "self_attn.o_proj.bias": ("self_attn.o_proj.bias", None),
    "self_attn.q_norm.weight": ("self_attn.q_norm", None),
    "self_attn.k_norm.weight": ("self_attn.k_norm", None),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", None),
    "mlp.gate.weight": ("mlp.gate.weight", None),  # a MoE layer's router
    # transformers 5 holds a MoE layer's experts fused and stacked, as nanojet does; a checkpoint may store them so.
    "mlp.experts.gate_up_proj": ("mlp.experts.gate_up_proj", None),
    "mlp.experts.down_proj": ("mlp.experts.down_proj", None),
    "input_layernorm.weight": ("input_layernorm", None),
    "post_attention_layernorm.weight": ("post_attention_layernorm", None),
}
# Per-expert names (after "mlp.experts.{e}.", the published Qwen3-MoE format) -> (stacked parameter, shard).
# Expert e's tensors fill row e of the stacked parameter.
EXPERT_NAMES: dict[str, tuple[str, int | None]] = {
    "gate_proj.weight": ("mlp.experts.gate_up_proj", 0),
    "up_proj.weight": ("mlp.experts.gate_up_proj", 1),
    "down_proj.weight": ("mlp.experts.down_proj", None),
}
STACKED = {ours for ours, _ in EXPERT_NAMES.values()}  # parameters with a leading expert dimension
GATE_UP = ("mlp.gate_up_proj.weight", "mlp.experts.gate_up_proj")  # [..., 2I, H]: gate rows, then up rows
# Names outside the decoder layers. The target's carry HF's "model." prefix; the draft head's have none.
TOP_NAMES: dict[str, tuple[str, int | None]] = {
    "embed_tokens.weight": ("embed_tokens.weight", None),
    "norm.weight": ("norm", None),
    "lm_head.weight": ("lm_head.weight", None),
    "fc.weight": ("fc.weight", None),
    "hidden_norm.weight": ("hidden_norm", None),
}


def fused_shard_sizes(module: nn.Module) -> dict[str, list[int]]:
    """Row sizes of each fused parameter's shards, keyed by the parameter's suffix."""
    attn = module.layers[0].self_attn
    qkv = [attn.q_size, attn.kv_size, attn.kv_size]
    sizes = {"self_attn.qkv_proj.weight": qkv, "self_attn.qkv_proj.bias": qkv}
    for name, param in module.named_parameters():
        if _suffix(name) in GATE_UP:  # dense and expert intermediate sizes differ: read each from its shape
            sizes[_suffix(name)] = [param.shape[-2] // 2] * 2
    return sizes


def map_name(hf_name: str) -> tuple[str, str, int | None, int | None] | None:
    """HF name -> (nanojet name, nanojet suffix, expert or None, shard or None), or None when the name is not
    ours. An expert index selects a row of a stacked parameter; a shard, a piece of a fused one."""
    name = hf_name.removeprefix("model.")
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        parts = rest.split(".", 3)  # "mlp.experts.{e}.{EXPERT_NAMES key}" for a per-expert tensor
        if parts[:2] == ["mlp", "experts"] and len(parts) == 4 and parts[2].isdigit():
            table, expert, rest = EXPERT_NAMES, int(parts[2]), parts[3]
        else:
            table, expert = LAYER_NAMES, None
        if rest in table:
            ours, shard = table[rest]
            return f"layers.{index}.{ours}", ours, expert, shard
        return None
    if name in TOP_NAMES:
        ours, shard = TOP_NAMES[name]
        return ours, ours, None, shard
    return None


def _pieces(name: str, param: torch.Tensor, shard_sizes: dict[str, list[int]]) -> list[tuple[int | None, int | None]]:
    """The (expert, shard) pieces a checkpoint must supply for one parameter."""
    suffix = _suffix(name)
    experts = range(param.shape[0]) if suffix in STACKED else [None]
    shards = range(len(shard_sizes[suffix])) if suffix in shard_sizes else [None]
    return [(expert, shard) for expert in experts for shard in shards]


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{index} is corrupt ({error}); re-download the checkpoint") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}; download the checkpoint there")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} (named in the shard index) is missing; re-download the checkpoint")
    return files


def iter_tensors(files: list[Path]):
    from safetensors import safe_open
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except Exception as error:  # safetensors has its own error types for truncated or garbled files
            raise ValueError(f"{file} is not a readable safetensors file ({error}); re-download it") from None


def load_weights(module: nn.Module, model_dir: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Load every parameter of `module` from the checkpoint in `model_dir`, converting dtype.

    Raises ValueError naming missing, unexpected or mis-shaped tensors. `ignore` lists HF names that may be
    present without a home (e.g. a tied checkpoint that still stores lm_head.weight)."""
    params = dict(module.named_parameters())
    shard_sizes = fused_shard_sizes(module)
    expected = {(name, *piece) for name, param in params.items() for piece in _pieces(name, param, shard_sizes)}
    loaded, unexpected = set(), []
    for hf_name, tensor in iter_tensors(checkpoint_files(Path(model_dir))):
        mapped = map_name(hf_name)
        if mapped is None or mapped[0] not in params:
            if hf_name.removeprefix("model.") not in ignore:
                unexpected.append(hf_name)
            continue
        name, suffix, expert, shard = mapped
        target = params[name].data
        if expert is not None:
            if expert >= target.shape[0]:
                raise ValueError(f"checkpoint tensor {hf_name} names expert {expert}, but the config has "
                                 f"{target.shape[0]} experts; config.json and the weights do not belong together")
            target = target[expert]
        if shard is not None:
            sizes = shard_sizes[suffix]
            target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)} but the config implies "
                             f"{tuple(target.shape)}; config.json and the weights do not belong together")
        target.copy_(tensor.to(target.dtype))
        if expert is None and shard is None:  # a whole parameter, e.g. experts stacked in one tensor
            loaded.update((name, *piece) for piece in _pieces(name, params[name], shard_sizes))
        else:
            loaded.add((name, expert, shard))
    if unexpected:
        raise ValueError(f"checkpoint has tensors this model does not use: {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''}; is config.json the right one?")
    missing = sorted(f"{n}" + ("" if e is None else f"[expert {e}]") + ("" if s is None else f"[shard {s}]")
                     for n, e, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}; "
                         f"the download is incomplete or belongs to another model")


def _suffix(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def hf_state_dict(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse mapping: nanojet parameters -> HF-named tensors (fused ones split, stacked experts written per
    expert as published checkpoints are), for saving."""
    shard_sizes = fused_shard_sizes(module)
    inverse = {(ours, shard): hf for hf, (ours, shard) in {**LAYER_NAMES, **TOP_NAMES}.items()}
    inverse.update({(ours, shard): hf for hf, (ours, shard) in EXPERT_NAMES.items()})
    out = {}
    for name, param in module.named_parameters():
        suffix = _suffix(name)
        layer_prefix = name[: len(name) - len(suffix)]
        for expert, shard in _pieces(name, param, shard_sizes):
            piece = param.detach() if expert is None else param.detach()[expert]
            if shard is not None:
                piece = piece.split(shard_sizes[suffix])[shard]
            hf = inverse[(suffix, shard)]
            if expert is not None:
                hf = f"mlp.experts.{expert}.{hf}"
            # HF keeps lm_head outside the "model." prefix that every other target tensor carries.
            key = hf if hf == "lm_head.weight" else f"{prefix}{layer_prefix}{hf}"
            out[key] = piece.contiguous()
    return out
