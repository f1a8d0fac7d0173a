"""ConVIRT in JAX/Flax."""
