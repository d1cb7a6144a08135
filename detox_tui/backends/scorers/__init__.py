"""Toxicity scorers behind one protocol: detoxify, any HF text classifier, offline profanity."""
