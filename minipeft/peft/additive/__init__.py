"""Methods that add parameters: at the input (prompt tuning), inside the model (prefix
tuning, bottleneck adapters, AdapterFusion, IA3's scaling vectors) and at the output
(proxy-tuning, which combines models' logits at decode time)."""
