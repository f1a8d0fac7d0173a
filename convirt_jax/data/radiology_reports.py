"""The usable sentences of a free-text radiology report: its FINDINGS and IMPRESSION, one per line.

ConVIRT trains on sentences sampled from the findings and impression of a report, so the other sections
(indication, comparison, technique, notification, ...) must not leak in: they describe the request, not
the image. Reports in the wild (MIMIC-CXR, hospital exports, CSVs) are loosely formatted, so the parser:

* finds section headings case-insensitively at line starts (`FINDINGS:`, `Impression :`, `IMPRESSION`
  alone on its line) and after a sentence end (`... None. FINDINGS: ...`); unknown upper-case headings
  (`PA AND LATERAL VIEWS OF THE CHEST:`) start a new section unless they sit inside findings or
  impression, where they are sub-headings (`ET TUBE: 4 cm above the carina.`) and kept as text;
* keeps FINDINGS + IMPRESSION (and their synonyms) when the report has either; otherwise keeps
  everything except the excluded sections (so a report without headings is used whole);
* drops MIMIC's `___` de-identification blanks and splits into sentences without breaking decimals
  (`2.5 cm`), abbreviations (`Dr.`, `e.g.`, `approx.`) or numbered lists (`1. ... 2. ...`).
"""
import re

# Section classes.
_FINDINGS = "findings"
_IMPRESSION = "impression"
_EXCLUDED = "excluded"
_OTHER = "other"      # kept only when the report has neither findings nor impression

_HEADING_CLASSES: dict[str, str] = {
    **dict.fromkeys([
        "FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS AND IMPRESSIONS",
        "FINDINGS/IMPRESSION", "FINDINGS/IMPRESSIONS", "FINDINGS & IMPRESSION", "OBSERVATIONS",
    ], _FINDINGS),
    **dict.fromkeys([
        "IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY", "OPINION",
        "DIAGNOSIS",
    ], _IMPRESSION),
    **dict.fromkeys([
        "INDICATION", "INDICATIONS", "CLINICAL INDICATION", "CLINICAL INDICATIONS",
        "HISTORY", "CLINICAL HISTORY", "MEDICAL HISTORY", "PATIENT HISTORY", "CLINICAL INFORMATION",
        "CLINICAL INFORMATION & QUESTIONS TO BE ANSWERED",
        "CLINICAL INFORMATION AND QUESTIONS TO BE ANSWERED",
        "CLINICAL DETAILS", "CLINICAL QUESTION", "REASON", "REASON FOR EXAM", "REASON FOR EXAMINATION",
        "REASON FOR STUDY", "REASON FOR REFERRAL", "COMPARISON", "COMPARISONS", "COMPARISON STUDY",
        "COMPARISON STUDIES", "COMPARISON EXAM", "PRIOR", "PRIORS", "PRIOR STUDIES", "REFERENCE EXAM",
        "TECHNIQUE", "TECHNIQUES", "PROCEDURE", "PROCEDURES", "EXAMINATION", "EXAM", "STUDY",
        "TYPE OF EXAMINATION", "TYPE OF EXAM", "NOTIFICATION", "NOTIFICATIONS", "WET READ",
        "RECOMMENDATION", "RECOMMENDATIONS", "DATE", "DATE OF EXAM", "ATTENDING", "RADIOLOGIST",
        "DICTATED BY", "SIGNED BY", "ELECTRONICALLY SIGNED BY",
    ], _EXCLUDED),
    **dict.fromkeys(["FINAL REPORT", "REPORT", "ADDENDUM", "PRELIMINARY REPORT"], _OTHER),
}

# An unknown upper-case heading naming the view is the findings of older reports
# ("PA AND LATERAL VIEWS OF THE CHEST: The lungs are clear.").
_VIEW_HEADING = re.compile(r"\b(VIEWS?|CHEST|RADIOGRAPHS?|FILMS?|PORTABLE|FRONTAL|SUPINE|UPRIGHT)\b")

_NAME = r"[A-Za-z][A-Za-z()&/ \t-]{0,80}?"
_LINE_START_HEADING = re.compile(rf"^[ \t]*(?P<name>{_NAME})[ \t]*:", re.M)
_WHOLE_LINE_HEADING = re.compile(rf"^[ \t]*(?P<name>{_NAME})[ \t]*:?[ \t]*$", re.M)
_MID_LINE_HEADING = re.compile(rf"(?<=[.!?])[ \t]+(?P<name>{_NAME})[ \t]*:")

_DEID_BLANK = re.compile(r"_{2,}")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# A list item starts at a line start (numbered or bulleted) or after a sentence end (numbered only).
_LIST_ITEM = re.compile(r"^[ \t]*(?:\d{1,2}[.)]|[-*\u2022])[ \t]+|(?<=[.!?:;])[ \t]+\d{1,2}[.)][ \t]+(?=\S)",
                        re.M)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
# Abbreviations after which a period never ends a sentence, and those after which it does only when
# a capitalised word follows ("... at 9 a.m. The lungs ...").
_NEVER_SPLIT_AFTER = frozenset(["dr.", "drs.", "mr.", "mrs.", "ms.", "prof.", "st.", "vs.", "cf.", "e.g.",
                                "i.e.", "approx.", "fig.", "no.", "nos."])
_SPLIT_BEFORE_CAPITAL_ONLY = frozenset(["etc.", "a.m.", "p.m.", "incl.", "resp.", "ca.", "min.", "max.",
                                        "hx.", "dx.", "pt.", "pts."])
_WORD = re.compile(r"[A-Za-z0-9]")


def _normalise_heading(name: str) -> str:
  name = re.sub(r"\s+", " ", name).strip().upper()
  return name.replace("(S)", "S")


def _heading_class(name: str) -> str | None:
  """The class of a known heading, or None.

  Generic words ("Study:", "Date:") count only capitalised, so that a hard-wrapped line starting with
  "study: ..." is not taken for a heading; findings/impression headings count in any casing.
  """
  cls = _HEADING_CLASSES.get(_normalise_heading(name))
  if cls in (_FINDINGS, _IMPRESSION) or (cls is not None and name.lstrip()[:1].isupper()):
    return cls
  return None


def _find_headings(text: str) -> list[tuple[int, int, str, bool]]:
  """(start, end, class, known) of every candidate heading, in text order, overlaps removed."""
  candidates = []
  for pattern in (_LINE_START_HEADING, _MID_LINE_HEADING):
    for m in pattern.finditer(text):
      name = m.group("name")
      cls = _heading_class(name)
      known = cls is not None
      if not known:
        letters = re.sub(r"[^A-Za-z]", "", name)
        # Unknown headings: upper case, short, colon-terminated, at a line start only.
        if (pattern is _MID_LINE_HEADING or len(letters) < 2 or not letters.isupper()
            or len(name.split()) > 8):
          continue
        cls = _FINDINGS if _VIEW_HEADING.search(name.upper()) else _OTHER
      candidates.append((m.start("name"), m.end(), cls, known))
  for m in _WHOLE_LINE_HEADING.finditer(text):
    cls = _heading_class(m.group("name"))
    if cls is not None:
      candidates.append((m.start("name"), m.end(), cls, True))
  candidates.sort()
  headings = []
  for candidate in candidates:
    if headings and candidate[0] < headings[-1][1]:
      continue
    headings.append(candidate)
  return headings


def _sections(text: str) -> list[tuple[str, str]]:
  """The report as (class, body) pairs; text before the first heading is `_OTHER`."""
  sections = []
  current_class, body_start = _OTHER, 0
  for start, end, cls, known in _find_headings(text):
    if not known and current_class in (_FINDINGS, _IMPRESSION):
      continue  # a sub-heading inside findings/impression ("ET TUBE: ...") is part of the text
    sections.append((current_class, text[body_start:start]))
    current_class, body_start = cls, end
  sections.append((current_class, text[body_start:]))
  return sections


def _split_chunk(chunk: str) -> list[str]:
  """Splits whitespace-normalised text into sentences at periods that end one."""
  sentences, start = [], 0
  for m in _SENTENCE_END.finditer(chunk):
    token = chunk[:m.end()].rsplit(None, 1)[-1].lstrip("([\"'").lower()
    following = chunk[m.end():].lstrip()[:1]
    if token in _NEVER_SPLIT_AFTER:
      continue
    if token in _SPLIT_BEFORE_CAPITAL_ONLY and not following.isupper():
      continue
    sentences.append(chunk[start:m.end()])
    start = m.end()
  sentences.append(chunk[start:])
  return sentences


def _tidy(sentence: str) -> str:
  sentence = re.sub(r"\s+", " ", sentence)
  sentence = re.sub(r"\(\s*\)", "", sentence)                # "(___)" once the blank is gone
  sentence = re.sub(r"\s+([,.;:!?)])", r"\1", sentence)
  sentence = re.sub(r"\(\s+", "(", sentence)
  sentence = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", sentence)  # "on ___, ___," -> "on,"
  sentence = re.sub(r"\s+", " ", sentence).strip()
  return sentence.lstrip(",;:. ").strip()


def _num_word_tokens(sentence: str) -> int:
  return sum(1 for token in sentence.split() if _WORD.search(token))


def split_sentences(text: str, min_tokens: int = 3) -> list[str]:
  """Sentences of `text` (no section logic), whitespace normalised, short ones dropped.

  Paragraph breaks and list items ("1. ...", "- ...") always end a sentence; single line breaks do not
  (reports are hard-wrapped). A sentence with fewer than `min_tokens` word tokens is dropped.
  """
  if not isinstance(text, str):
    raise TypeError(f"report text must be a str, got {type(text).__name__}")
  text = _DEID_BLANK.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
  sentences = []
  for paragraph in _PARAGRAPH_BREAK.split(text):
    for item in _LIST_ITEM.split(paragraph):
      chunk = re.sub(r"\s+", " ", item).strip()
      for sentence in _split_chunk(chunk):
        sentence = _tidy(sentence)
        if sentence and _num_word_tokens(sentence) >= min_tokens:
          sentences.append(sentence)
  return sentences


def report_sentences(text: str, min_tokens: int = 3) -> list[str]:
  """The FINDINGS and IMPRESSION sentences of a radiology report, in report order.

  Args:
    text: the report as written (any casing, wrapping, MIMIC-CXR style or not).
    min_tokens: sentences with fewer word tokens (e.g. "None.", "1.") are dropped.

  Returns:
    One string per sentence; empty when the report has no usable text (e.g. only an indication).
  """
  if not isinstance(text, str):
    raise TypeError(f"report text must be a str, got {type(text).__name__}")
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  sections = _sections(text)
  wanted = [body for cls, body in sections if cls in (_FINDINGS, _IMPRESSION)]
  if not wanted:
    wanted = [body for cls, body in sections if cls == _OTHER]
  sentences = []
  for body in wanted:
    sentences.extend(split_sentences(body, min_tokens))
  return sentences
