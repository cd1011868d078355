"""The model layer: composition (encoders -> projectors -> LLM), the processor, and model folders."""
