"""Adapters between omni and Hugging Face transformers models (configs and state-dict key maps)."""
