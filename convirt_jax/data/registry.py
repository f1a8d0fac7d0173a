"""The data sets a config can name (`config.data.name`): one registration line each, read without
importing any builder, so that configs are checked at once.

Every list of data set names (the configs' choices, the builders `datasets.load_dataset` opens, the
titles of results.md) comes from here. A new data set is its builder module under
`convirt_jax/data/builders/` (a `*Params` dataclass, `params_from_config`, a `LocalBuilder` that
declares its task, labels and splits) plus one `register` line below.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str     # config.data.name
  module: str   # its builder's module, imported on use: convirt_jax.data.builders.<module>, or a full
                # dotted path (a builder kept outside the package)
  builder: str  # the builder class in that module
  title: str    # how the results and the plots name it
  needs_dir: str = ""  # what config.data.dir must be (a download it is built from), "" if nothing


_ENTRIES: dict[str, Entry] = {}


def register(name: str, module: str, builder: str, title: str, *, needs_dir: str = "") -> Entry:
  """Adds a data set (a module imported by name when first used); the name must be new. `needs_dir`:
  what config.data.dir must name for it ("the MIMIC-CXR-JPG directory"), checked with the config."""
  if name in _ENTRIES:
    raise ValueError(f"a data set named {name!r} is registered already ({_ENTRIES[name]})")
  _ENTRIES[name] = Entry(name, module, builder, title, needs_dir)
  return _ENTRIES[name]


def names() -> tuple[str, ...]:
  """The registered names, in registration order."""
  return tuple(_ENTRIES)


def find(name: str) -> Entry | None:
  """The registered data set of that name, or None."""
  return _ENTRIES.get(name)


def needs_dir(name: str) -> str:
  """What config.data.dir must name for the data set ("" when it needs none or is not registered)."""
  return _ENTRIES[name].needs_dir if name in _ENTRIES else ""


def title(name: str) -> str:
  """The data set's title, or its name when none is registered (a results file of another version)."""
  return _ENTRIES[name].title if name in _ENTRIES else name


# Pretraining sets (image-report pairs).
register("synthetic", "synthetic", "SyntheticCxr", "Synthetic CXR")
register("mimic_cxr", "mimic_cxr", "MimicCxr", "MIMIC-CXR", needs_dir="the MIMIC-CXR-JPG directory")
register("csv", "csv_pairs", "CsvPairs", "CSV labels")
# The paper's downstream classification sets (images and labels, no reports).
register("rsna", "rsna", "RsnaPneumonia", "RSNA Pneumonia", needs_dir="the directory of the rsna download")
register("chexpert", "chexpert", "Chexpert", "CheXpert", needs_dir="the directory of the chexpert download")
register("covidx", "covidx", "Covidx", "COVIDx", needs_dir="the directory of the covidx download")
register("mura", "mura", "Mura", "MURA", needs_dir="the directory of the mura download")
