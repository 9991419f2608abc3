"""Property-based conformance suite: checks a LoRA backend against the reference."""
