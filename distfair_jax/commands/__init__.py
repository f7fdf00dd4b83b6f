"""`distfair` subcommands, one module each (see distfair_jax/cli.py).

Each command's ``run`` imports the package modules it needs (jax, flax, the model, ...) inside the
function, the one place in the package where package imports are local: ``distfair --help`` and
argument errors answer without importing jax, and a command pays only for what it runs.
"""
