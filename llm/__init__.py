"""Divot-LLM: a Mistral with LoRA that reads and writes Divot tokens."""
