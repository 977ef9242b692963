"""Serving NBL checkpoints in inference engines: the vLLM plugin (``pip install -e ".[serve]"``)."""
