"""jaxbatch.testing: the batcher laws (DESIGN.md) as checks anyone can run on a batcher.

`check_batcher(batcher, elements)` runs a small stream through every path a user can take
(step loop with and without `jit`, `lax.scan`, `batch_all`, the bulk `feed`, save and
resume, `vmap`) and raises `AssertionError` naming the law, the step and the element when
one breaks. `assert_batch_matches_spec`, `assert_valid_rows_equal` and `assert_no_valid_rows`
are chex-style assertions on batches and emissions, for users' own (chex) tests. Hypothesis
strategies for streams and configurations live in `jaxbatch.testing.strategies` (it needs
`hypothesis`; this module does not).

Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbatch as jb
    >>> from jaxbatch.testing import check_batcher
    >>> check_batcher(jb.fixed_size(2), {"x": jnp.arange(4)}, check_jit=False).num_batches
    2
"""

from ._assertions import (
    assert_batch_matches_spec as assert_batch_matches_spec,
    assert_no_valid_rows as assert_no_valid_rows,
    assert_valid_rows_equal as assert_valid_rows_equal,
)
from ._laws import CheckReport as CheckReport, check_batcher as check_batcher
