"""The synthetic chest X-ray corpus: determinism, labels, faithful reports, where findings are drawn."""
import dataclasses
import io
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from convirt_jax.data import synthetic

SIZE = 96
# A finding is mentioned by a sentence that matches its pattern; absent ones only in negations.
MENTIONS = {
    "cardiomegaly": r"cardiomegaly|enlarged|enlargement",
    "pleural_effusion": r"effusion",
    "consolidation": r"consolidation|pneumonia|airspace",
    "pneumothorax": r"pneumothorax",
    "edema": r"edema",
    "atelectasis": r"atelectasis",
    "support_devices": r"\btubes?\b|catheter|picc|pacemaker|\bij line",
}
NEGATION = r"\b(no|not|without)\b"
SEVERITY_WORDS = {  # per finding, the words of each severity
    "cardiomegaly": (r"\bmild", r"\bmoderate", r"\bmarked|\bsevere"),
    "pleural_effusion": (r"\bsmall\b", r"\bmoderate", r"\blarge\b"),
    "pneumothorax": (r"\bsmall\b", r"\bmoderate", r"\blarge\b"),
    "edema": (r"\bmild\b", r"\bmoderate\b", r"\bsevere\b"),
}


def mentioned_sides(sentence: str) -> set[str]:
  sides = set()
  if re.search(r"bilateral|\bboth\b|bibasilar", sentence):
    sides |= {"right", "left"}
  if re.search(r"\bright\b", sentence):
    sides.add("right")
  if re.search(r"\bleft\b|lingula", sentence):
    sides.add("left")
  return sides


def report_sentences(report: str) -> list[str]:
  """FINDINGS and IMPRESSION sentences, lower-cased, numbering removed."""
  match = re.search(r"findings:(.*)impression:(.*)", report, flags=re.S | re.I)
  assert match, report
  text = " ".join(" ".join(match.groups()).split()).lower()
  text = re.sub(r"\b\d+\.\s", "", text)
  return [s for s in re.split(r"(?<=\.)\s+", text) if s]


def render_pair(case: synthetic.Case, name: str):
  """The case and the same patient without `name`: their difference is exactly the finding."""
  without = dataclasses.replace(case, findings=tuple(f for f in case.findings if f.name != name))
  with_image = synthetic.render_image(case, SIZE).astype(np.float64)
  return with_image - synthetic.render_image(without, SIZE)


def image_half(side: str) -> slice:
  # PA view: the patient's right is the image's left.
  return slice(0, SIZE // 2) if side == "right" else slice(SIZE // 2, SIZE)


def test_deterministic_and_index_dependent():
  a = synthetic.generate_study(3, "train", 17, image_size=64)
  b = synthetic.generate_study(3, "train", 17, image_size=64)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  assert a["report"] == b["report"]
  for other in (synthetic.generate_study(3, "train", 18, image_size=64),
                synthetic.generate_study(4, "train", 17, image_size=64),
                synthetic.generate_study(3, "test", 17, image_size=64)):
    assert not np.array_equal(a["image"], other["image"])
    assert a["report"] != other["report"]
  c = synthetic.generate_category_study(3, "retrieval_queries", 5, "edema", image_size=64)
  d = synthetic.generate_category_study(3, "retrieval_queries", 5, "edema", image_size=64)
  np.testing.assert_array_equal(c["image"], d["image"])
  assert c["report"] == d["report"]


def test_generation_order_does_not_matter():
  forward = [synthetic.generate_study(0, "test", i, 32) for i in range(4)]
  backward = [synthetic.generate_study(0, "test", i, 32) for i in reversed(range(4))][::-1]
  for a, b in zip(forward, backward):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["report"] == b["report"]


def test_labels_and_report_do_not_depend_on_image_size():
  small = synthetic.generate_study(0, "validation", 4, image_size=64)
  large = synthetic.generate_study(0, "validation", 4, image_size=160)
  assert small["report"] == large["report"]
  np.testing.assert_array_equal(small["labels"], large["labels"])
  # The same patient: the large image, shrunk, is close to the small one.
  shrunk = np.asarray(Image.fromarray(large["image"]).resize((64, 64), Image.BILINEAR), np.float64)
  assert np.abs(shrunk - small["image"]).mean() < 10


def test_shapes_and_dtypes():
  for size in (32, 64, 128):
    study = synthetic.generate_study(1, "train", 0, image_size=size)
    assert study["image"].shape == (size, size) and study["image"].dtype == np.uint8
    assert study["labels"].shape == (8,) and study["labels"].dtype == np.float32
    assert set(np.unique(study["labels"])) <= {0.0, 1.0}
    assert isinstance(study["report"], str)
    assert study["report"].upper().index("FINDINGS:") < study["report"].upper().index("IMPRESSION:")
  assert len(synthetic.LABEL_NAMES) == 8 and synthetic.LABEL_NAMES[0] == "no_finding"


def test_label_rates_and_no_finding_consistency():
  labels = np.stack([synthetic.sample_case(0, "train", i).labels for i in range(400)])
  np.testing.assert_array_equal(labels[:, 0], (labels[:, 1:].sum(1) == 0).astype(np.float32))
  rates = dict(zip(synthetic.LABEL_NAMES, labels.mean(0)))
  bounds = {"no_finding": (0.15, 0.35), "cardiomegaly": (0.12, 0.32),
            "pleural_effusion": (0.15, 0.38), "consolidation": (0.08, 0.25),
            "pneumothorax": (0.04, 0.18), "edema": (0.08, 0.24), "atelectasis": (0.14, 0.32),
            "support_devices": (0.18, 0.4)}
  for name, (lo, hi) in bounds.items():
    assert lo <= rates[name] <= hi, (name, rates[name])
  assert (labels[:, 1:].sum(1) >= 2).mean() > 0.2  # several findings per image are common
  # The public entry point returns the labels of the sampled case.
  for i in range(5):
    np.testing.assert_array_equal(synthetic.generate_study(0, "train", i, 32)["labels"],
                                  labels[i])


def test_reports_describe_exactly_the_positive_findings_with_side_and_severity():
  checked_sides = checked_severity = 0
  for i in range(300):
    case = synthetic.sample_case(7, "train", i)
    sentences = report_sentences(synthetic.write_report(case))
    assert sentences
    present = {f.name: f for f in case.findings}
    for name, pattern in MENTIONS.items():
      mentions = [s for s in sentences if re.search(pattern, s)]
      positive = [s for s in mentions if not re.search(NEGATION, s)]
      if name not in present:
        assert not positive, (name, positive, case)
        continue
      assert positive, (name, sentences)
      sides = set(synthetic.finding_sides(present[name]))
      if sides:
        # Every side named is a drawn side, and at least one sentence names all of them.
        assert all(mentioned_sides(s) <= sides for s in positive), (name, sides, positive)
        assert any(mentioned_sides(s) == sides for s in positive), (name, sides, positive)
        checked_sides += 1
      if name in SEVERITY_WORDS:
        words = SEVERITY_WORDS[name]
        wrong = "|".join(w for i, w in enumerate(words) if i != present[name].severity)
        assert not any(re.search(wrong, s) for s in positive), (name, present[name], positive)
        checked_severity += any(re.search(words[present[name].severity], s) for s in positive)
  assert checked_sides > 100 and checked_severity > 60, (checked_sides, checked_severity)


def test_reports_have_varied_structure():
  reports = [synthetic.generate_study(2, "train", i, 32)["report"] for i in range(120)]
  assert len(set(reports)) == len(reports)
  preamble = [r for r in reports if re.search(r"INDICATION:|HISTORY:|COMPARISON:", r)]
  assert 0.3 < len(preamble) / len(reports) < 0.95
  assert any("\n" in report.split("FINDINGS:")[-1] for report in reports)  # wrapped lines
  hedged = [r for r in reports if re.search(r"likely|may represent|concerning for", r, re.I)]
  assert len(hedged) > 10
  incidental = [r for r in reports if re.search(r"degenerative|clips|osteopenia|tortuous", r, re.I)]
  assert len(incidental) > 20


@pytest.mark.parametrize("category", synthetic.LABEL_NAMES)
def test_category_studies_have_exactly_that_label(category):
  for index in range(4):
    study = synthetic.generate_category_study(0, "retrieval_candidates", index, category, 32)
    expected = np.zeros(8, np.float32)
    expected[synthetic.LABEL_NAMES.index(category)] = 1
    np.testing.assert_array_equal(study["labels"], expected)
    sentences = report_sentences(study["report"])
    if category != "no_finding":
      assert any(re.search(MENTIONS[category], s) and not re.search(NEGATION, s)
                 for s in sentences)


def test_retrieval_queries_cover_every_category():
  assert list(synthetic.RETRIEVAL_TEXT_QUERIES) == list(synthetic.LABEL_NAMES)
  for category, queries in synthetic.RETRIEVAL_TEXT_QUERIES.items():
    assert len(queries) >= 3 and len(set(queries)) == len(queries)
    for query in queries:
      assert query.strip() == query and query.endswith(".")
      if category != "no_finding":
        assert re.search(MENTIONS[category], query.lower()), (category, query)


def first_case_with(name: str, predicate=lambda f: True, start: int = 0):
  for index in range(start, start + 200):
    case = synthetic.sample_case(0, "retrieval_candidates", index, category=name)
    if predicate(case.findings[0]):
      return case
  raise AssertionError(f"no {name} case found")


@pytest.mark.parametrize("side", synthetic.SIDES)
def test_effusion_and_atelectasis_are_basal_and_on_their_side(side):
  for name in ("pleural_effusion", "atelectasis"):
    for start in (0, 50):
      case = first_case_with(name, lambda f: f.sites == (side,), start)
      diff = render_pair(case, name)
      assert diff.min() >= -1  # opacities only brighten
      mine = diff[SIZE // 2:, image_half(side)].sum()
      other = "left" if side == "right" else "right"
      assert mine > 30, (name, side, mine)
      assert np.abs(diff[:, image_half(other)]).sum() < 0.1 * mine
      assert diff[: int(SIZE * 0.4)].sum() < 0.1 * mine  # nothing in the upper zones


@pytest.mark.parametrize("side", synthetic.SIDES)
def test_pneumothorax_is_a_lucent_rim_on_its_side(side):
  case = first_case_with("pneumothorax", lambda f: f.sites == (side,) and f.severity == 1)
  diff = render_pair(case, "pneumothorax")
  other = "left" if side == "right" else "right"
  mine = diff[:, image_half(side)]
  assert mine[mine < 0].sum() < -30  # lucency: no lung markings lateral to the pleural line
  assert mine.max() > 3  # the pleural line itself is white
  assert np.abs(diff[:, image_half(other)]).sum() < 0.05 * np.abs(mine).sum()


def test_consolidation_is_in_its_lobe():
  for lobe in ("right upper lobe", "left lower lobe", "right lower lobe", "left upper lobe"):
    case = first_case_with("consolidation", lambda f: f.sites == (lobe,))
    diff = np.clip(render_pair(case, "consolidation"), 0, None)
    rows = np.arange(SIZE)[:, None]
    centre_row = (diff * rows).sum() / diff.sum() / SIZE
    side = lobe.split()[0]
    assert diff[:, image_half(side)].sum() > 0.9 * diff.sum(), lobe
    assert (centre_row < 0.5) if "upper" in lobe else (centre_row > 0.5), (lobe, centre_row)


def test_cardiomegaly_edema_and_devices_are_drawn_where_expected():
  cols = np.arange(SIZE)[None, :]
  case = first_case_with("cardiomegaly", lambda f: f.severity >= 1)
  diff = render_pair(case, "cardiomegaly")
  assert diff.min() >= -1 and diff.sum() > 200
  # The heart grows towards the patient's left (image right), above the diaphragm.
  assert (diff * cols).sum() / diff.sum() > SIZE / 2
  case = first_case_with("edema", lambda f: f.severity >= 1)
  diff = np.clip(render_pair(case, "edema"), 0, None)
  left, right = diff[:, :SIZE // 2].sum(), diff[:, SIZE // 2:].sum()
  assert left > 50 and 1 / 3 < left / right < 3  # bilateral
  case = first_case_with("support_devices")
  diff = render_pair(case, "support_devices")
  assert diff.max() > 25 and (diff > 10).mean() < 0.05  # thin and bright


def test_findings_are_localised_but_visible():
  """Every finding changes some pixels clearly, and most of the image not at all."""
  for name in synthetic.LABEL_NAMES[1:]:
    for start in (0, 30, 60):
      case = first_case_with(name, start=start)
      diff = np.abs(render_pair(case, name))
      assert diff.max() >= 8, (name, case.findings)
      assert (diff > 4).mean() < 0.25, (name, (diff > 4).mean(), case.findings)


def test_effusion_brightens_the_lower_lateral_zone_of_its_side_across_studies():
  """Between different patients (not a paired difference): what a probe has to pick up."""

  def zone_asymmetry(image, side):
    rows = slice(int(SIZE * 0.55), int(SIZE * 0.8))
    left_zone, right_zone = image[rows, int(SIZE * 0.1):int(SIZE * 0.3)], image[
        rows, int(SIZE * 0.7):int(SIZE * 0.9)]
    on_image_left = left_zone.mean() - right_zone.mean()
    return on_image_left if side == "right" else -on_image_left

  effusion, normal = [], []
  for index in range(40):
    case = synthetic.sample_case(1, "test", index, category="pleural_effusion")
    sites = case.findings[0].sites
    if len(sites) == 1:
      effusion.append(zone_asymmetry(synthetic.render_image(case, SIZE), sites[0]))
    study = synthetic.generate_category_study(1, "test", index, "no_finding", SIZE)
    normal.append(zone_asymmetry(study["image"], synthetic.SIDES[index % 2]))
  assert len(effusion) > 15
  assert np.mean(effusion) - np.mean(normal) > 5, (np.mean(effusion), np.mean(normal))


def test_no_finding_shows_in_the_global_brightness():
  """Exposure varies between patients far more than any finding changes the mean pixel value."""
  studies = [synthetic.generate_study(9, "validation", i, 48) for i in range(300)]
  brightness = np.array([s["image"].mean() for s in studies])
  labels = np.stack([s["labels"] for s in studies])
  for j, name in enumerate(synthetic.LABEL_NAMES):
    assert 0.3 < roc_auc_score(labels[:, j], brightness) < 0.7, name


def test_anatomy_lungs_darker_than_mediastinum_and_abdomen():
  for index in range(10):
    image = synthetic.generate_study(5, "train", index, SIZE)["image"].astype(np.float64)
    lungs = np.concatenate([image[30:50, 20:35].ravel(), image[30:50, 61:76].ravel()]).mean()
    mediastinum = image[15:35, 44:52].mean()
    abdomen = image[88:, 20:76].mean()
    assert lungs + 20 < mediastinum and lungs + 20 < abdomen, (lungs, mediastinum, abdomen)


def test_bad_input_raises_naming_the_argument():
  with pytest.raises(ValueError, match="split"):
    synthetic.generate_study(0, "training", 0)
  with pytest.raises(ValueError, match="index"):
    synthetic.generate_study(0, "train", -1)
  with pytest.raises(ValueError, match="seed"):
    synthetic.generate_study(-3, "train", 0)
  with pytest.raises(ValueError, match="category"):
    synthetic.generate_category_study(0, "train", 0, "pneumonia")
  with pytest.raises(ValueError, match="image_size"):
    synthetic.generate_study(0, "train", 0, image_size=8)


def test_encode_png_round_trips():
  image = synthetic.generate_study(0, "train", 0, 64)["image"]
  for shaped in (image, image[..., None]):
    decoded = np.asarray(Image.open(io.BytesIO(synthetic.encode_png(shaped))))
    np.testing.assert_array_equal(decoded, image)
  with pytest.raises(ValueError, match="uint8"):
    synthetic.encode_png(image.astype(np.float32))
