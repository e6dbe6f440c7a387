"""The MoE cost of speculation: how many experts a target forward touches. A decode step routes one token to k
experts per MoE layer; a verify over N tree nodes routes N tokens and reads up to min(N * k, E) experts, so on a
MoE target a verify is not the one memory-bound step it is on a dense one. `bench.py --experts-touched` prints
this curve per tree budget."""
import torch

from nanojet.engine.engine import Engine
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.qwen3 import Qwen3, SparseMoE


def sparse_layers(target: Qwen3) -> list[SparseMoE]:
    return [layer.mlp for layer in target.layers if isinstance(layer.mlp, SparseMoE)]


def expert_bytes(target: Qwen3) -> int:
    """Bytes of one expert's weights (gate, up and down) in one layer; 0 for a dense target."""
    layers = sparse_layers(target)
    if not layers:
        return 0
    experts = layers[0].experts
    return sum(p[0].numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj))


class ExpertRecorder:
    """Within `with ExpertRecorder(target) as recorder:`, every target forward appends to `recorder.forwards` a
    (tokens, [distinct experts touched in each MoE layer]) record, and the number of distinct token ids it ran to
    `recorder.distinct_tokens`. The routing is recomputed from each MoE block's input by its own `route`, so it is
    the routing the forward used. Eager forwards only: hooks do not run inside a compiled graph."""

    def __init__(self, target: Qwen3):
        self.target = target
        self.distinct_tokens: list[int] = []
        self.layers = sparse_layers(target)
        if not self.layers:
            raise ValueError("counting experts needs a MoE target (Qwen3MoeForCausalLM); this one is dense")
        self.forwards: list[tuple[int, list[int]]] = []
        self._handles = []

    def _record(self, module: SparseMoE, args) -> None:
        h = args[0].reshape(-1, args[0].shape[-1])
        with torch.no_grad():
            _, ids = module.route(h)
        if module is self.layers[0]:
            self.forwards.append((h.shape[0], []))
        self.forwards[-1][1].append(int(torch.unique(ids).numel()))

    def _record_tokens(self, module: Qwen3, args) -> None:
        self.distinct_tokens.append(int(torch.unique(args[0]).numel()))

    def __enter__(self) -> "ExpertRecorder":
        self._handles = [layer.register_forward_pre_hook(self._record) for layer in self.layers]
        self._handles.append(self.target.register_forward_pre_hook(self._record_tokens))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def uniform_routing_experts(tokens: int, num_experts: int, top_k: int) -> float:
    """Expected distinct experts when each of `tokens` tokens picks k distinct experts uniformly at random (an
    expert misses one token with probability 1 - k/E)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def expert_touch_curve(engine: Engine, prompt: list[int], budgets: list[int], width: int,
                       max_new_tokens: int) -> list[dict]:
    """Per budget, greedy decoding of `prompt` (budget 1: plain decoding) with every target forward after the
    prefill recorded: mean tree nodes verified per round, mean distinct experts per MoE layer per round, and
    what that costs in expert weight bytes against one decode step."""
    if engine.execution != "eager":
        raise ValueError("counting experts runs eager rounds (hooks do not run in graphs); drop --compile, and add "
                         "--enforce-eager on CUDA")
    config, target = engine.target.config, engine.target
    top_k, experts = config.num_experts_per_tok, config.num_experts
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    rows = []
    for budget in budgets:
        with ExpertRecorder(target) as recorder:
            engine.generate(prompt, params, SpeculativeParams(budget, width) if budget > 1 else None)
        rounds, distinct_tokens, covered = recorder.forwards, recorder.distinct_tokens, 0
        while covered < len(prompt):  # the first forwards cover the prompt (the prefill, maybe chunked)
            covered += rounds.pop(0)[0]
            distinct_tokens.pop(0)
        nodes = sum(tokens for tokens, _ in rounds) / len(rounds)
        touched = sum(sum(layers) / len(layers) for _, layers in rounds) / len(rounds)
        uniform = sum(uniform_routing_experts(tokens, experts, top_k) for tokens, _ in rounds) / len(rounds)
        rows.append({"budget": budget, "rounds": len(rounds), "tree_nodes": nodes,
                     "distinct_tokens": sum(distinct_tokens) / len(distinct_tokens), "experts_per_layer": touched,
                     "max_experts_per_layer": max(max(layers) for _, layers in rounds),
                     "bound": sum(min(tokens * top_k, experts) for tokens, _ in rounds) / len(rounds),
                     "uniform_routing": uniform, "over_decode_step": touched / top_k,
                     "expert_bytes_per_round": touched * len(recorder.layers) * expert_bytes(target)})
    return rows


def print_expert_curve(rows: list[dict], config) -> None:
    layers = sum(config.is_sparse_layer(i) for i in range(config.num_hidden_layers))
    print(f"experts touched per MoE layer and round ({config.num_experts} experts, top-{config.num_experts_per_tok}, "
          f"{layers} MoE layers); a decode step touches {config.num_experts_per_tok}")
    print(f"{'budget':>6} {'nodes':>7} {'tokens':>7} {'experts':>8} {'max':>5} {'x decode':>8} {'min(Nk,E)':>9} "
          f"{'uniform':>8} {'expert GB':>9}")
    for r in rows:
        print(f"{r['budget']:>6} {r['tree_nodes']:>7.1f} {r['distinct_tokens']:>7.1f} {r['experts_per_layer']:>8.1f} "
              f"{r['max_experts_per_layer']:>5} {r['over_decode_step']:>7.2f}x {r['bound']:>9.1f} {r['uniform_routing']:>8.1f} "
              f"{r['expert_bytes_per_round'] / 1e9:>9.3f}")
    print("nodes: tree nodes verified per round; tokens: distinct token ids among them; experts: distinct experts "
          "per MoE layer (mean over layers and rounds); uniform: what uniformly random routing of that many tokens "
          "would touch; expert GB: expert weights one round reads, in the run's dtype, over these layers")

