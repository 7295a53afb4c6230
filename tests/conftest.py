"""Test configuration: several CPU devices for cross-device tests, strict rank promotion."""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
