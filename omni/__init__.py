"""omni: train and serve an omni-modal LLM (docs/architecture.md)."""
