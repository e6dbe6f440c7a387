"""The runtime's models: the Qwen3 target (dense and MoE), the causal draft head, their configs and checkpoint
loading, and the CPU's packed weights."""
