"""TFDS builders (ArrayRecord, readable without TensorFlow): synthetic, mimic_cxr, csv_pairs.

Each module has a frozen `*Params` dataclass (what changes the data; the BuilderConfig is named by its
hash), `params_from_config(config)`, and a `GeneratorBasedBuilder` taking `params=`. Use them through
`convirt_jax.data.datasets.load_dataset`.
"""
