"""Integration layer: the only code that imports vLLM."""
