"""The data set registry: one registration line makes a data set a config choice the jobs can open."""
import pytest

from convirt_jax import config as config_lib
from convirt_jax import transfer_config
from convirt_jax.data import datasets, registry
from convirt_jax.errors import ConfigError


@pytest.fixture
def scratch_registry(monkeypatch):
  monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))


def test_a_registered_data_set_is_a_choice_of_both_configs_and_its_builder_is_found(scratch_registry):
  registry.register("synthetic_copy", "synthetic", "SyntheticCxr", "Another synthetic set")
  config = config_lib.base_config()
  config.data.name = "synthetic_copy"
  config_lib.validate(config)
  transfer = transfer_config.transfer_config()
  transfer.data.name = "synthetic_copy"
  transfer.encoders = ("random",)
  transfer_config.validate_transfer(transfer)
  module, builder = datasets._builder_parts(config)
  assert module.__name__ == "convirt_jax.data.builders.synthetic" and builder.__name__ == "SyntheticCxr"
  assert registry.title("synthetic_copy") == "Another synthetic set"
  with pytest.raises(ValueError, match="registered already"):
    registry.register("synthetic_copy", "synthetic", "SyntheticCxr", "again")


def test_an_unknown_name_lists_the_registered_ones():
  config = config_lib.base_config()
  config.data.name = "nope"
  with pytest.raises(ConfigError, match=r"config.data.name='nope': must be one of \('synthetic', 'mimic_cxr'"):
    config_lib.validate(config)
  assert registry.names() == ("synthetic", "mimic_cxr", "csv", "rsna", "chexpert", "covidx", "mura")
