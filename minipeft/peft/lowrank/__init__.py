"""Low-rank methods: ΔW as a product of small factors (LoRA and its variants, LoRAHub)."""
