"""Model loading, scorers, editing methods, covariance statistics and causal tracing."""
