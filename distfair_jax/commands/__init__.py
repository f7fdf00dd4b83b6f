"""`distfair` subcommands, one module each (see distfair_jax/cli.py)."""
