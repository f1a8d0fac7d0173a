"""Writing the free-text report of a synthetic case (`write_report`) from templates, and the text queries
per category for text->image retrieval (`RETRIEVAL_TEXT_QUERIES`).

Reports describe every drawn finding (side, lobe, severity, size) and nothing else that is drawn, with
synonyms, hedging, negations of absent findings, incidental sentences and varied layout.
"""
from __future__ import annotations

import numpy as np

from convirt_jax.data.synthetic_cxr.cases import FINDING_NAMES, REPORT_STREAM, Case, Finding

# Short queries per category, phrased like report sentences but not copied from the templates.
RETRIEVAL_TEXT_QUERIES: dict[str, list[str]] = {
    "no_finding": [
        "No acute cardiopulmonary process.", "Normal chest radiograph.",
        "The lungs are clear and the heart size is normal.",
        "No focal consolidation, pleural effusion, or pneumothorax.",
        "No acute intrathoracic abnormality."],
    "cardiomegaly": [
        "Enlarged cardiac silhouette.", "Moderate cardiomegaly.", "The heart is enlarged.",
        "Marked enlargement of the heart.", "Mild cardiomegaly."],
    "pleural_effusion": [
        "Moderate left pleural effusion.", "Small right pleural effusion.",
        "Bilateral pleural effusions.", "Blunting of the costophrenic angle consistent with effusion.",
        "Large pleural effusion with a meniscus."],
    "consolidation": [
        "Right lower lobe consolidation.", "Patchy airspace opacity concerning for pneumonia.",
        "Focal consolidation in the left upper lobe.", "Findings compatible with pneumonia.",
        "Dense lobar consolidation."],
    "pneumothorax": [
        "Small right apical pneumothorax.", "Large left pneumothorax.",
        "Visible pleural line with absent lung markings, consistent with pneumothorax.",
        "Moderate pneumothorax."],
    "edema": [
        "Moderate pulmonary edema.", "Perihilar haziness consistent with interstitial edema.",
        "Mild pulmonary edema.", "Severe bilateral pulmonary edema."],
    "atelectasis": [
        "Bibasilar atelectasis.", "Plate-like atelectasis at the left lung base.",
        "Linear opacity at the right base, likely atelectasis.", "Subsegmental basilar atelectasis."],
    "support_devices": [
        "Endotracheal tube in standard position.",
        "Right internal jugular central venous catheter with tip in the SVC.",
        "Enteric tube with tip in the stomach.", "Left chest wall pacemaker with leads in the heart."],
}

_CM_PER_UNIT = 19.0  # body units -> cm, for the measurements the reports quote

_SEVERITY_WORDS = {
    "cardiomegaly": (("mild",), ("moderate",), ("marked", "severe")),
    "cardiomegaly_adverb": (("mildly",), ("moderately",), ("markedly", "severely")),
    "pleural_effusion": (("small",), ("moderate", "moderate-sized"), ("large",)),
    "consolidation": (("subtle", "faint", "mild"), ("patchy", "focal"), ("dense", "extensive")),
    "pneumothorax": (("small",), ("moderate", "moderate-sized"), ("large",)),
    "edema": (("mild",), ("moderate",), ("severe",)),
    "atelectasis": (("minimal", "subsegmental"), ("mild", "plate-like"),
                    ("moderate", "substantial")),
}

_FINDING_TEMPLATES = {
    "cardiomegaly": [
        "{sev} cardiomegaly.", "the heart is {sevly} enlarged.",
        "{sev} enlargement of the cardiac silhouette.", "the cardiac silhouette is {sevly} enlarged.",
        "heart size is {sevly} enlarged."],
    "effusion_one": [
        "{sev} {side} pleural effusion.", "there is a {sev} {side} pleural effusion.",
        "{sev} {side} pleural effusion is present.",
        "opacity at the {side} base with a meniscus, consistent with a {sev} pleural effusion.",
        "{side} pleural effusion, {sev} in size."],
    "effusion_both": [
        "{sev} bilateral pleural effusions.", "bilateral {sev} pleural effusions.",
        "{sev} right and left pleural effusions.",
        "blunting of both costophrenic angles, compatible with {sev} bilateral effusions."],
    "effusion_small": ["blunting of the {side} costophrenic angle, compatible with a small effusion."],
    "consolidation": [
        "{sev} opacity in the {lobe}, concerning for pneumonia.",
        "{sev} airspace consolidation in the {lobe}.",
        "{sev} airspace opacity in the {lobe}, which may represent pneumonia.",
        "{sev} consolidation is seen in the {lobe}, likely pneumonia.",
        "there is {sev} consolidation of the {lobe}."],
    "consolidation_two": [
        "{sev} consolidation in the {lobe} and {lobe2}.",
        "multifocal {sev} airspace opacities in the {lobe} and {lobe2}, likely pneumonia."],
    "pneumothorax": [
        "{sev} {side} pneumothorax.", "there is a {sev} {side} pneumothorax.",
        "{side} pneumothorax measuring approximately {cm} cm.",
        "a visible pleural line with absent peripheral lung markings indicates a {sev} {side} "
        "pneumothorax.",
        "{sev} {side} pneumothorax, with the pleural edge about {cm} cm from the chest wall."],
    "pneumothorax_small": ["small {side} apical pneumothorax."],
    "edema": [
        "{sev} pulmonary edema.", "perihilar haziness and interstitial markings consistent with {sev} "
        "pulmonary edema.", "{sev} bilateral perihilar opacities, compatible with pulmonary edema.",
        "there is {sev} pulmonary edema.", "{sev} interstitial pulmonary edema."],
    "atelectasis_one": [
        "{sev} {side} basilar atelectasis.", "{sev} atelectasis at the {side} lung base.",
        "linear opacity at the {side} base, likely {sev} atelectasis.",
        "streaky {side} basal opacity, most likely atelectasis."],
    "atelectasis_both": [
        "bibasilar atelectasis.", "{sev} bibasilar atelectasis.",
        "linear opacities at both lung bases, likely atelectasis."],
    "endotracheal tube": [
        "endotracheal tube terminates approximately {cm} cm above the carina.",
        "ET tube tip is {cm} cm above the carina.",
        "the endotracheal tube is in standard position, {cm} cm above the carina."],
    "enteric tube": [
        "enteric tube courses below the diaphragm with tip in the stomach.",
        "nasogastric tube tip is in the stomach.", "an orogastric tube extends into the stomach."],
    "right internal jugular line": [
        "right internal jugular central venous catheter tip in the SVC.",
        "right IJ line terminates in the mid SVC.",
        "a right internal jugular catheter ends in the superior vena cava."],
    "picc": ["{side} PICC line tip in the lower SVC.",
             "{side} upper extremity PICC terminates in the SVC."],
    "pacemaker": [
        "left chest wall pacemaker with leads in the right atrium and right ventricle.",
        "dual-chamber pacemaker with leads terminating in the right atrium and right ventricle.",
        "a left-sided pacemaker is in place with two leads."],
}

_IMPRESSION_TEMPLATES = {
    "cardiomegaly": ["{sev} cardiomegaly.", "cardiomegaly.", "enlarged cardiac silhouette."],
    "effusion_one": ["{sev} {side} pleural effusion.", "{side} pleural effusion."],
    "effusion_both": ["bilateral pleural effusions.", "{sev} bilateral pleural effusions."],
    "consolidation": ["{lobe} pneumonia.", "findings concerning for pneumonia in the {lobe}.",
                      "{lobe} consolidation, likely pneumonia."],
    "consolidation_two": ["multifocal pneumonia.", "pneumonia in the {lobe} and {lobe2}."],
    "pneumothorax": ["{sev} {side} pneumothorax.", "{side} pneumothorax."],
    "edema": ["{sev} pulmonary edema.", "findings consistent with {sev} pulmonary edema.",
              "pulmonary edema."],
    "atelectasis_one": ["{side} basilar atelectasis.", "{sev} atelectasis at the {side} base."],
    "atelectasis_both": ["bibasilar atelectasis."],
    "support_devices": ["support devices as above.", "lines and tubes in appropriate position.",
                        "tubes and lines as described."],
}

_NORMAL_HEART = [
    "heart size is normal.", "the heart is normal in size.",
    "cardiac silhouette is within normal limits.", "normal heart size.", "the heart is not enlarged.",
    "the cardiomediastinal silhouette is normal.", "heart size and mediastinal contours are normal."]
_MEDIASTINUM = ["mediastinal and hilar contours are unremarkable.", "the mediastinum is normal.",
                "hilar contours are normal."]
_CLEAR_LUNGS = ["the lungs are clear.", "lungs are well expanded and clear.", "clear lungs."]
_NEGATIONS = {
    ("pleural_effusion", "pneumothorax"): [
        "no pleural effusion or pneumothorax.", "there is no pleural effusion or pneumothorax.",
        "no effusion or pneumothorax is seen."],
    ("consolidation", "pleural_effusion", "pneumothorax"): [
        "no focal consolidation, pleural effusion, or pneumothorax."],
    ("pleural_effusion",): ["no pleural effusion.", "no pleural effusions."],
    ("pneumothorax",): ["no pneumothorax.", "there is no pneumothorax."],
    ("consolidation",): ["no focal consolidation.",
                         "no focal airspace consolidation to suggest pneumonia."],
    ("edema",): ["no pulmonary edema.", "no evidence of pulmonary edema.",
                 "there is no pulmonary vascular congestion or edema."],
}
_INCIDENTAL = [
    "degenerative changes of the thoracic spine.", "surgical clips in the upper abdomen.",
    "old healed rib fractures.", "calcification of the aortic knob.",
    "the thoracic aorta is mildly tortuous.", "mild degenerative changes of both shoulders.",
    "cholecystectomy clips are seen.", "diffuse osteopenia.",
    "multilevel degenerative changes of the spine."]
_NORMAL_BONES = ["no acute osseous abnormality.", "visualized osseous structures are unremarkable."]
_NORMAL_IMPRESSION = [
    "no acute cardiopulmonary process.", "no acute intrathoracic abnormality.",
    "normal chest radiograph.", "no acute cardiopulmonary abnormality.",
    "no radiographic evidence of acute disease."]
_SYMPTOMS = ["cough", "shortness of breath", "fever", "chest pain", "dyspnea", "hypoxia",
             "evaluate for pneumonia", "line placement", "preoperative evaluation", "weakness"]


def _sentence(text: str) -> str:
  return text[0].upper() + text[1:]


def _finding_sentence(rng, finding: Finding, impression: bool) -> list[str]:
  """Sentences that describe a positive finding, with its side, lobe, severity and size."""
  templates = _IMPRESSION_TEMPLATES if impression else _FINDING_TEMPLATES
  pick = lambda options: options[rng.integers(len(options))]
  name, sev = finding.name, finding.severity
  words = _SEVERITY_WORDS.get(name, ((),) * 3)
  fields = dict(sev=pick(words[sev]) if words[sev] else "")
  if name == "cardiomegaly":
    fields["sevly"] = pick(_SEVERITY_WORDS["cardiomegaly_adverb"][sev])
    return [pick(templates[name]).format(**fields)]
  if name in ("pleural_effusion", "atelectasis"):
    key = "effusion" if name == "pleural_effusion" else "atelectasis"
    if len(finding.sites) == 2:
      return [pick(templates[key + "_both"]).format(**fields)]
    options = list(templates[key + "_one"])
    if name == "pleural_effusion" and sev == 0 and not impression:
      options += _FINDING_TEMPLATES["effusion_small"]
    return [pick(options).format(side=finding.sites[0], **fields)]
  if name == "consolidation":
    if len(finding.sites) == 2:
      return [pick(templates["consolidation_two"]).format(
          lobe=finding.sites[0], lobe2=finding.sites[1], **fields)]
    return [pick(templates[name]).format(lobe=finding.sites[0], **fields)]
  if name == "pneumothorax":
    options = list(templates[name])
    if sev == 0 and not impression:
      options += _FINDING_TEMPLATES["pneumothorax_small"]
    cm = max(1, round(finding.sizes[0] * _CM_PER_UNIT))
    return [pick(options).format(side=finding.sites[0], cm=cm, **fields)]
  if name == "edema":
    return [pick(templates[name]).format(**fields)]
  if name == "support_devices":
    if impression:
      return [pick(templates[name])]
    sentences = []
    for device, size in zip(finding.sites, finding.sizes):
      key = "picc" if device.endswith("picc") else device
      cm = max(1, round(size * _CM_PER_UNIT))
      sentences.append(pick(_FINDING_TEMPLATES[key]).format(side=device.split()[0], cm=cm))
    return sentences
  raise ValueError(f"unknown finding {name!r}")


def _negations(rng, absent: set[str]) -> list[str]:
  sentences = []
  groups = list(_NEGATIONS)
  rng.shuffle(groups)
  covered: set[str] = set()
  for group in sorted(groups, key=len, reverse=True):
    if set(group) <= absent and not covered & set(group) and rng.random() < 0.6:
      options = _NEGATIONS[group]
      sentences.append(options[rng.integers(len(options))])
      covered |= set(group)
  return sentences


def write_report(case: Case) -> str:
  """A free-text radiology report that describes every drawn finding and nothing else that is drawn."""
  rng = np.random.default_rng([*case.entropy, REPORT_STREAM])
  pick = lambda options: options[rng.integers(len(options))]
  present = {f.name: f for f in case.findings}
  absent = set(FINDING_NAMES) - set(present)

  devices, lungs, pleura, heart, other = [], [], [], [], []
  if "support_devices" in present:
    devices += _finding_sentence(rng, present["support_devices"], impression=False)
  for name in ("consolidation", "edema", "atelectasis"):
    if name in present:
      lungs += _finding_sentence(rng, present[name], impression=False)
  if not {"consolidation", "edema", "atelectasis", "pneumothorax"} & set(present):
    if rng.random() < 0.7:
      lungs.append(pick(_CLEAR_LUNGS))
  for name in ("pleural_effusion", "pneumothorax"):
    if name in present:
      pleura += _finding_sentence(rng, present[name], impression=False)
  pleura += _negations(rng, absent)
  if "cardiomegaly" in present:
    heart += _finding_sentence(rng, present["cardiomegaly"], impression=False)
  elif rng.random() < 0.85:
    heart.append(pick(_NORMAL_HEART))
  if rng.random() < 0.4:
    heart.append(pick(_MEDIASTINUM))
  incidental = int(rng.choice(3, p=(0.6, 0.3, 0.1)))
  other += [_INCIDENTAL[i] for i in rng.choice(len(_INCIDENTAL), incidental, replace=False)]
  if not incidental and rng.random() < 0.3:
    other.append(pick(_NORMAL_BONES))
  blocks = [devices, lungs, pleura, heart] if rng.random() < 0.7 else [heart, devices, lungs, pleura]
  findings = [s for block in blocks + [other] for s in block] or [pick(_NORMAL_HEART)]

  impression = []
  order = ("pneumothorax", "consolidation", "edema", "pleural_effusion", "cardiomegaly",
           "atelectasis", "support_devices")
  for name in order:
    if name in present and (name not in ("atelectasis", "support_devices") or rng.random() < 0.6):
      impression += _finding_sentence(rng, present[name], impression=True)
  if not present:
    impression.append(pick(_NORMAL_IMPRESSION))
  elif not impression:
    impression += _finding_sentence(rng, case.findings[0], impression=True)
  numbered = len(impression) > 1 and rng.random() < 0.2

  findings = [_sentence(s) for s in findings]
  impression = [_sentence(s) for s in impression]
  if numbered:
    impression = [f"{i + 1}. {s}" for i, s in enumerate(impression)]
  return _format_report(rng, _preamble(rng), findings, impression)


def _preamble(rng) -> list[tuple[str, str]]:
  pick = lambda options: options[rng.integers(len(options))]
  sections = []
  if rng.random() < 0.5:
    sections.append(("EXAMINATION", pick(["CHEST (PA AND LAT)", "Chest radiograph, frontal view.",
                                          "CHEST PORTABLE AP"])))
  if rng.random() < 0.6:
    sex = pick(["M", "F", "man", "woman"])
    key = pick(["INDICATION", "HISTORY", "CLINICAL HISTORY"])
    sections.append((key, f"___ year old {sex} with {pick(_SYMPTOMS)}."))
  if rng.random() < 0.3:
    sections.append(("TECHNIQUE", pick(["PA and lateral views of the chest.",
                                        "Single frontal view of the chest."])))
  if rng.random() < 0.5:
    sections.append(("COMPARISON", pick(["None.", "___.", "Chest radiograph from ___."])))
  return sections


def _format_report(rng, preamble, findings: list[str], impression: list[str]) -> str:
  sep = "  " if rng.random() < 0.4 else " "
  wrap = int(rng.integers(60, 80)) if rng.random() < 0.5 else 0
  inline = rng.random() < 0.3

  def body(sentences: list[str]) -> str:
    text = sep.join(sentences)
    if not wrap:
      return text
    lines, line = [], ""
    for word in text.split(" "):
      if line and len(line) + 1 + len(word) > wrap:
        lines.append(line)
        line = word
      else:
        line = f"{line} {word}" if line else word
    return "\n ".join(lines + [line])

  parts = ["FINAL REPORT"] if rng.random() < 0.4 else []
  parts += [f"{key}:  {value}" for key, value in preamble]
  for header, sentences in (("FINDINGS", findings), ("IMPRESSION", impression)):
    parts.append(f"{header}: {body(sentences)}" if inline else f"{header}:\n \n {body(sentences)}")
  report = "\n \n".join(parts) if rng.random() < 0.5 else "\n\n".join(parts)
  if rng.random() < 0.05:
    report = report.upper()
  return " " + report + "\n" if rng.random() < 0.3 else report
