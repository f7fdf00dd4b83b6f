"""Test setup: 8 simulated CPU devices for the sharding tests.

XLA reads XLA_FLAGS once, when jax first initialises its backends, so it is set here, before any
test module imports jax. Tests that need one device use ``jax.devices()[0]`` explicitly.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
