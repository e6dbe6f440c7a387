"""Model configuration: HF `config.json` of a Qwen3 (dense or Qwen3-MoE) read into a validated dataclass."""
import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts:
            self._check_moe()

    def _check_moe(self) -> None:
        experts, top_k = self.num_experts, self.num_experts_per_tok
        if not isinstance(experts, int) or experts < 1:
            raise ValueError(f"config: num_experts must be a positive integer for a MoE model, got {experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= experts:
            raise ValueError(f"config: num_experts_per_tok must lie in 1..num_experts ({experts}), got {top_k!r}")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            raise ValueError(f"config: moe_intermediate_size must be a positive integer, got "
                             f"{self.moe_intermediate_size!r}")
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step < 1:
            raise ValueError(f"config: decoder_sparse_step must be a positive integer, got {self.decoder_sparse_step!r}")
        if any(not isinstance(i, int) or i < 0 for i in self.mlp_only_layers):
            raise ValueError(f"config: mlp_only_layers must list layer indices >= 0, got {self.mlp_only_layers!r}")

    def is_sparse_layer(self, index: int) -> bool:
        """Whether decoder layer `index` has a MoE block: transformers' rule (Qwen3MoeDecoderLayer), which applies
        both `mlp_only_layers` and `decoder_sparse_step`."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        architectures = raw.get("architectures") or ["Qwen3ForCausalLM"]
        if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
            raise ValueError(f"config: architecture {architectures} is not supported; nanojet runs "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen3, dense or MoE)")
        moe = MOE_ARCHITECTURE in architectures or raw.get("model_type") == "qwen3_moe"
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"config: config.json lacks {', '.join(missing)}; is this a Qwen3 config?")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"config: rope scaling {rope_type!r} is not supported yet; remove it from config.json")
        eos = raw.get("eos_token_id")
        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 40960),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            **(moe_fields(raw) if moe else {}),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist; pass --model with a Qwen3 "
                                    f"checkpoint directory (see nanojet/weights/README.md)")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; a model directory needs config.json and *.safetensors")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); re-download the checkpoint") from None
        return cls.from_dict(raw)


def moe_fields(raw: dict) -> dict:
    """The Qwen3-MoE keys of a config.json. Published checkpoints name the expert count `num_experts`;
    transformers 5 writes `num_local_experts`; either is accepted (both must then agree)."""
    counts = {key: raw[key] for key in ("num_experts", "num_local_experts") if raw.get(key) is not None}
    if len(set(counts.values())) > 1:
        raise ValueError(f"config: num_experts and num_local_experts disagree ({counts}); fix config.json")
    count = next(iter(counts.values()), None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"config: a Qwen3-MoE config needs num_experts (or num_local_experts) >= 1, got {count!r}")
    missing = [k for k in ("num_experts_per_tok", "moe_intermediate_size") if k not in raw]
    if missing:
        raise ValueError(f"config: Qwen3-MoE config.json lacks {', '.join(missing)}")
    return dict(num_experts=count, num_experts_per_tok=raw["num_experts_per_tok"],
                moe_intermediate_size=raw["moe_intermediate_size"],
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                decoder_sparse_step=raw.get("decoder_sparse_step", 1),
                mlp_only_layers=list(raw.get("mlp_only_layers") or []))
