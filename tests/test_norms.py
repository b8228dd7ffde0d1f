"""easympt's LayerNorm against flax's: the same parameters and output bits, and a written backward
equal to autodiff of flax's forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easympt.layers import LayerNorm


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("x_dtype,dtype", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.bfloat16)])
def test_layer_norm_equals_flax_forward_and_backward(use_bias, x_dtype, dtype):
    kw = dict(epsilon=1e-5, use_bias=use_bias, dtype=dtype)
    ours, theirs = LayerNorm(**kw), nn.LayerNorm(use_fast_variance=False, **kw)
    x = (jax.random.normal(jax.random.PRNGKey(0), (3, 5, 96)) * 4 + 2).astype(x_dtype)
    params = theirs.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree_util.tree_structure(params)
    params = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    y_ours, y_theirs = ours.apply(params, x), theirs.apply(params, x)
    assert y_ours.dtype == y_theirs.dtype and bool(jnp.all(y_ours == y_theirs))

    w = jax.random.normal(jax.random.PRNGKey(3), x.shape)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)) * w)

    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    for g, t in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.dtype == t.dtype and g.shape == t.shape
        g, t = np.asarray(g, np.float32), np.asarray(t, np.float32)
        tol = 1e-5 if x_dtype == jnp.float32 else 2e-2  # bfloat16 x: dx is rounded to bfloat16 on both sides
        assert np.abs(g - t).max() <= tol * max(1.0, np.abs(t).max()), np.abs(g - t).max()
