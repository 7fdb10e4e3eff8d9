"""Test-wide JAX settings: set before any JAX op runs.

* 4 simulated CPU devices, so sharding code paths run on this 2-core machine.
* strict dtype promotion and rank promotion that raises, as in equinox's own suite.
* jaxtyping + beartype check every annotated function of `jaxbatch` at run time.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("jaxbatch", "beartype.beartype"):
    import jaxbatch  # noqa: E402, F401

from hypothesis import HealthCheck, settings  # noqa: E402

# JAX compiles on first call, so the first example of a property is slow: no deadline.
settings.register_profile(
    "jaxbatch",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jaxbatch")
