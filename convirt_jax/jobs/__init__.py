"""The jobs, each a `run(...)` that the command lines (`convirt_jax.cli`) call, and nothing imports back:
pretrain.py (python -m convirt_jax.main), transfer.py with transfer_encoders.py (python -m
convirt_jax.transfer), export.py (python -m convirt_jax.export)."""
