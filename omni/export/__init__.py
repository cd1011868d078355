"""Hugging Face exports: the folder writer, the remote code it ships, the model card, the Hub push."""
