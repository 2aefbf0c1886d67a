"""Corpora, tokenizers, prepared (sharded) data, masking and the training data loader."""
