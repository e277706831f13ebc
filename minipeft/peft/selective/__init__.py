"""Methods that select parameters: train a chosen subset of the model's own weights (BitFit's
biases, Child-tuning's and FishMask's masked entries) instead of adding new ones."""
