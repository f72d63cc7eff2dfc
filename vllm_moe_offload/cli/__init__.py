"""The ``vllm-moe-offload`` command line: one module per subcommand, listed in ``main.py``."""
