"""Flax NNX modules: linear (with LoRA), norm, attention, router, MoE block, decoder."""
