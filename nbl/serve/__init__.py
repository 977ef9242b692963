"""Serving NBL checkpoints in inference engines: the vLLM plugin (``pip install -e ".[serve]"``)."""

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention (tests pin them)
