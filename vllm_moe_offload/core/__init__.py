"""Policy core: cache policies, configuration and statistics. Imports neither torch nor vLLM."""
