"""Data: sources of documents, tokenized splits cached on disk, and the batch sampler."""
