"""Runtime layer (torch): expert storage tiers, transfers and slot pools. No vLLM imports."""
