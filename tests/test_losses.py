"""convirt_loss against an independent float64 NumPy implementation, CLIP, padding masks and devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from convirt_jax import losses, parallel


def numpy_convirt_terms(v, u, tau, lam):
  """The paper's eq. 2-3 written out in float64, row by row."""
  v = np.asarray(v, np.float64)
  u = np.asarray(u, np.float64)
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  n = len(v)
  sim = v @ u.T / tau  # sim[i, k] = <v_i, u_k> / tau
  l_vu = np.array([-sim[i, i] + np.log(np.sum(np.exp(sim[i, :]))) for i in range(n)])
  l_uv = np.array([-sim[i, i] + np.log(np.sum(np.exp(sim[:, i]))) for i in range(n)])
  return {
      "loss": np.mean(lam * l_vu + (1 - lam) * l_uv),
      "loss_image_to_text": np.mean(l_vu),
      "loss_text_to_image": np.mean(l_uv),
      "accuracy_image_to_text": np.mean(np.argmax(sim, axis=1) == np.arange(n)),
      "accuracy_text_to_image": np.mean(np.argmax(sim, axis=0) == np.arange(n)),
  }


def random_pairs(n, d=512, seed=0, match=0.0):
  """Gaussian embeddings; `match` > 0 pulls each text towards its image so accuracies are not ~0."""
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(n, d)).astype(np.float32)
  u = (match * v + rng.normal(size=(n, d))).astype(np.float32)
  return v, u


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.75, 1.0])
def test_matches_numpy_float64(tau, lam):
  v, u = random_pairs(32, seed=int(tau * 100) + int(lam * 10), match=0.08)
  got = jax.jit(lambda v, u: losses.convirt_loss_terms(v, u, temperature=tau, image_weight=lam))(v, u)
  want = numpy_convirt_terms(v, u, tau, lam)
  for key, value in want.items():
    assert got[key].dtype == jnp.float32
    np.testing.assert_allclose(float(got[key]), value, rtol=0, atol=1e-6, err_msg=key)
  # The accuracies must be informative here, else the comparison above proves little about them.
  assert 0 < want["accuracy_image_to_text"] < 1
  assert float(losses.convirt_loss(v, u, temperature=tau, image_weight=lam)) == pytest.approx(
      float(got["loss"]), abs=1e-6)


def test_default_hyperparameters_are_the_papers():
  v, u = random_pairs(16, seed=3, match=0.5)
  np.testing.assert_allclose(float(losses.convirt_loss(v, u)),
                             numpy_convirt_terms(v, u, 0.1, 0.75)["loss"], atol=1e-6)


@pytest.mark.parametrize("tau", [0.07, 0.1])
def test_half_weight_is_the_clip_loss(tau):
  v, u = random_pairs(32, d=64, seed=1, match=0.5)
  # CLIP (Radford et al.): symmetric cross-entropy of logit_scale * cosine similarities.
  image = torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float64), dim=-1)
  text = torch.nn.functional.normalize(torch.tensor(u, dtype=torch.float64), dim=-1)
  logits = (1.0 / tau) * image @ text.T
  labels = torch.arange(len(v))
  clip = (torch.nn.functional.cross_entropy(logits, labels) +
          torch.nn.functional.cross_entropy(logits.T, labels)) / 2
  got = losses.convirt_loss(v, u, temperature=tau, image_weight=0.5)
  np.testing.assert_allclose(float(got), clip.item(), rtol=0, atol=1e-6)


def test_mask_equals_loss_on_real_rows():
  v, u = random_pairs(24, d=32, seed=2, match=0.5)
  mask = np.ones(24, bool)
  mask[[0, 5, 6, 13, 22, 23]] = False
  # Padding rows carry arbitrary embeddings: they must not count, neither as rows nor as negatives.
  v[~mask] *= 100.0
  got = losses.convirt_loss_terms(v, u, mask=jnp.asarray(mask))
  want = losses.convirt_loss_terms(v[mask], u[mask])
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=0, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(float(got["loss"]), numpy_convirt_terms(v[mask], u[mask], 0.1, 0.75)["loss"],
                             atol=1e-6)


def test_all_padding_is_finite_zero():
  v, u = random_pairs(8, d=16)
  terms = losses.convirt_loss_terms(v, u, mask=jnp.zeros(8, bool))
  assert all(float(x) == 0.0 for x in terms.values())


def test_low_precision_inputs_are_scored_in_float32():
  v, u = random_pairs(16, d=64, seed=4, match=0.5)
  v16, u16 = jnp.asarray(v, jnp.bfloat16), jnp.asarray(u, jnp.bfloat16)
  got = losses.convirt_loss(v16, u16)
  assert got.dtype == jnp.float32
  want = numpy_convirt_terms(np.asarray(v16, np.float32), np.asarray(u16, np.float32), 0.1, 0.75)
  np.testing.assert_allclose(float(got), want["loss"], atol=1e-6)


def test_zero_embedding_does_not_produce_nan():
  v, u = random_pairs(8, d=16)
  v[3] = 0.0
  value, grads = jax.value_and_grad(losses.convirt_loss, argnums=(0, 1))(v, u)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in grads)


def _sharded(fn, mesh):
  """fn(v, u, mask) run per device on row blocks, its scalar output replicated."""
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
                               out_specs=P()))


def test_gathered_over_8_devices_equals_single_device():
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  v, u = random_pairs(32, d=64, seed=5, match=0.4)
  mask = np.ones(32, bool)
  tau, lam = 0.1, 0.75

  def loss(v, u, mask, axis_name):
    return losses.convirt_loss(v, u, temperature=tau, image_weight=lam, axis_name=axis_name,
                               mask=mask)

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1))
  want, want_grads = jax.jit(lambda v, u, m: grad_fn(v, u, m, None))(v, u, mask)

  # Gradient taken outside shard_map, through the gather.
  per_device = _sharded(lambda v, u, m: loss(v, u, m, "data"), mesh)
  got, got_grads = jax.value_and_grad(per_device, argnums=(0, 1))(v, u, mask)
  np.testing.assert_allclose(float(got), float(want), rtol=0, atol=1e-6)
  np.testing.assert_allclose(float(got), numpy_convirt_terms(v, u, tau, lam)["loss"], atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-8)

  # Every directional term and accuracy too.
  terms = jax.jit(jax.shard_map(
      lambda v, u: losses.convirt_loss_terms(v, u, axis_name="data"), mesh=mesh,
      in_specs=(P("data"), P("data")), out_specs=P()))(v, u)
  want_terms = numpy_convirt_terms(v, u, 0.1, 0.75)
  for key, value in want_terms.items():
    np.testing.assert_allclose(float(terms[key]), value, rtol=0, atol=1e-6, err_msg=key)


def test_gathered_mask_spread_over_devices():
  mesh = parallel.make_mesh()
  v, u = random_pairs(32, d=32, seed=6, match=0.5)
  mask = np.ones(32, bool)
  mask[[1, 2, 3, 9, 30, 31]] = False  # Device 0 keeps one real row, device 7 two.
  v[~mask] = 7.0
  got = _sharded(lambda v, u, m: losses.convirt_loss(v, u, axis_name="data", mask=m), mesh)(v, u, mask)
  want = numpy_convirt_terms(v[mask], u[mask], 0.1, 0.75)["loss"]
  np.testing.assert_allclose(float(got), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature"),
    ({"image_weight": 1.5}, "image_weight"),
    ({"mask": jnp.ones(3, bool)}, "mask"),
])
def test_bad_arguments_raise(kwargs, message):
  v, u = random_pairs(4, d=8)
  with pytest.raises(ValueError, match=message):
    losses.convirt_loss(v, u, **kwargs)


def test_mismatched_shapes_raise():
  v, u = random_pairs(4, d=8)
  with pytest.raises(ValueError, match=r"\[n, d\]"):
    losses.convirt_loss(v, u[:3])
