"""Fake data for the builders' tests: the configs that build it, the writers of its files, its read-back.

Shared by test_builders, test_downstream_builders and test_bad_inputs (tests/ is on sys.path). Every dataset
built here is stored at SIZE with 2 build threads. pydicom is imported only by `write_dicom`, so that the
tests of the other builders do not need it.
"""
import csv
import os

import numpy as np
from PIL import Image

from convirt_jax.config import base_config
from convirt_jax.data import datasets

SIZE = 16  # stored_size of the datasets built from fake files


# --- Configs --------------------------------------------------------------------------------------


def _config(name, **data):
  config = base_config()
  config.data.name = name
  config.data.stored_size = SIZE
  config.data.build_threads = 2
  for key, value in data.items():
    config.data[key] = value
  return config


def csv_config(csv_path, **data):
  """The config of the CSV of pairs at `csv_path`; `data` sets more of config.data."""
  return _config("csv", csv=str(csv_path), **data)


def dir_config(name, root, **data):
  """The config of the data set `name` ("mimic_cxr", "rsna", ...) whose download is in `root`; `data` sets
  more of config.data."""
  return _config(name, dir=str(root), **data)


# --- Files ----------------------------------------------------------------------------------------


def write_csv(path, header, rows):
  """A CSV file of the `header` row (none when None) and `rows`, its folder made if needed."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    if header:
      writer.writerow(header)
    writer.writerows(rows)


def save_image(path, array, **kwargs):
  """`array` saved as an image in the format of `path`'s suffix (`kwargs` go to Pillow), its folder made if
  needed; returns the file's name."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return os.path.basename(path)


def write_dicom(path, pixels, *, photometric="MONOCHROME2", bits_stored=None, **elements):
  """An uncompressed DICOM file of `pixels` (uint8 or uint16), written with pydicom; `elements` are set on
  the dataset last (PatientID is the file's name without .dcm unless given)."""
  # pylint: disable=g-import-not-at-top
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID = "CR", os.path.basename(str(path))[:-4]
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  bits = 8 if pixels.dtype == np.uint8 else 16
  ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
  ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
  for key, value in elements.items():
    setattr(ds, key, value)
  ds.PixelData = pixels.tobytes()
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  ds.save_as(str(path), enforce_file_format=True)


# --- Reading back ---------------------------------------------------------------------------------


def records(source) -> list[dict]:
  """The decoded records of a split's source, in order."""
  return [datasets.decode_record(source[i]) for i in range(len(source))]


def by_id(dataset) -> dict[str, dict]:
  """Every decoded record of a dataset, by its id."""
  return {r["id"]: r for source in dataset.sources.values() for r in records(source)}


def skipped(dataset) -> dict[str, int]:
  """Skipped records per reason, over all splits."""
  total = {}
  for counts in dataset.info.metadata["skipped"].values():
    for reason, n in counts.items():
      total[reason] = total.get(reason, 0) + int(n)
  return total
