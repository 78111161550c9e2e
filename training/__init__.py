"""Training entry points and the runtime they share (accelerate + DeepSpeed)."""
