"""report_sentences: findings + impression of MIMIC-style and malformed reports, split into sentences."""
import pytest

from convirt_jax.data.radiology_reports import report_sentences, split_sentences

# Written in the style of MIMIC-CXR reports (hard-wrapped at ~78 columns, "___" de-identification).
STANDARD = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.  Clips project over the left lung,
 potentially within the breast. The imaged upper abdomen is unremarkable.
 Chronic deformity of the posterior left sixth and seventh ribs are noted.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""

OLD_STYLE = """\
                                 FINAL REPORT
 HISTORY:  ___-year-old man with chest pain.
 
 PA AND LATERAL VIEWS OF THE CHEST:  The heart size is top normal.  There is a
 2.5 cm nodular opacity in the right upper lobe, approx. 3 cm from the hilum.
 
 IMPRESSION:
 1. Right upper lobe nodule.  Recommend CT for further evaluation.
 2. No pleural effusion or pneumothorax.
 
 NOTIFICATION:  The findings were discussed with Dr. ___ by Dr. ___ on the
 telephone on ___ at 9:14 AM, 2 minutes after discovery of the findings.
"""

WET_READ_IMPRESSION_ONLY = """\
WET READ: ___ ___ 8:34 PM
  Right IJ line tip at cavoatrial junction.  No pneumothorax.
 ______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  ___ year old woman with new right IJ line.  // line placement?
 
 COMPARISON:  Chest radiograph from ___.
 
 IMPRESSION:  Compared to chest radiographs since ___, most recently ___, the
 new right internal jugular line ends in the low SVC.  Lines and tubes: ET TUBE:
 tip 4 cm above the carina.  Mild pulmonary edema has improved, e.g. at the
 right base.
"""

FINDINGS_ONLY = """\
 FINAL REPORT
 CLINICAL INFORMATION & QUESTIONS TO BE ANSWERED: History: ___F with cough.
 
 FINDINGS:  Moderate cardiomegaly is stable.  Small bilateral pleural effusions
 are slightly larger, the left measuring 1.5 cm in depth.  There is no
 pneumothorax.
 
 RECOMMENDATION(S):  Follow-up radiograph in 2 weeks.
"""

NO_HEADINGS = """\
 The lungs are clear.  The cardiomediastinal silhouette is within normal limits.
 No acute osseous abnormalities.
"""


def test_standard_report_keeps_findings_and_impression_only():
  assert report_sentences(STANDARD) == [
      "There is no focal consolidation, pleural effusion or pneumothorax.",
      "Bilateral nodular opacities that most likely represent nipple shadows.",
      "The cardiomediastinal silhouette is normal.",
      "Clips project over the left lung, potentially within the breast.",
      "The imaged upper abdomen is unremarkable.",
      "Chronic deformity of the posterior left sixth and seventh ribs are noted.",
      "No acute cardiopulmonary process.",
  ]


def test_view_heading_numbered_impression_decimals_and_abbreviations():
  assert report_sentences(OLD_STYLE) == [
      "The heart size is top normal.",
      "There is a 2.5 cm nodular opacity in the right upper lobe, approx. 3 cm from the hilum.",
      "Right upper lobe nodule.",
      "Recommend CT for further evaluation.",
      "No pleural effusion or pneumothorax.",
  ]


def test_wet_read_blanks_and_sub_headings_inside_impression():
  assert report_sentences(WET_READ_IMPRESSION_ONLY) == [
      "Compared to chest radiographs since, most recently, the new right internal jugular line ends in "
      "the low SVC.",
      "Lines and tubes: ET TUBE: tip 4 cm above the carina.",
      "Mild pulmonary edema has improved, e.g. at the right base.",
  ]


def test_findings_only_excludes_clinical_information_and_recommendations():
  assert report_sentences(FINDINGS_ONLY) == [
      "Moderate cardiomegaly is stable.",
      "Small bilateral pleural effusions are slightly larger, the left measuring 1.5 cm in depth.",
      "There is no pneumothorax.",
  ]


def test_report_without_headings_is_used_whole():
  expected = ["The lungs are clear.", "The cardiomediastinal silhouette is within normal limits.",
              "No acute osseous abnormalities."]
  assert report_sentences(NO_HEADINGS) == expected
  assert report_sentences(" FINAL REPORT\n" + NO_HEADINGS) == expected


def test_without_findings_or_impression_everything_but_excluded_sections_is_kept():
  text = "INDICATION: Fever.\nCOMPARISON: None.\n\nPORTABLE AP CHEST: Lungs are clear bilaterally.\n"
  assert report_sentences(text) == ["Lungs are clear bilaterally."]
  text = "HISTORY: Fever.\n\nADDENDUM: The right lower lobe opacity has resolved."
  assert report_sentences(text) == ["The right lower lobe opacity has resolved."]


def test_odd_casing_and_spacing():
  text = ("comparison :  none\nfindings :  the lungs are clear.   the heart is  normal in size.\n"
          "impression:no acute process")
  assert report_sentences(text) == ["the lungs are clear.", "the heart is normal in size.",
                                    "no acute process"]
  text = "Findings\n   Heart size is normal.\nIMPRESSION\nNormal chest radiograph."
  assert report_sentences(text) == ["Heart size is normal.", "Normal chest radiograph."]


def test_headings_within_a_single_line():
  text = ("EXAMINATION: CHEST PORTABLE. COMPARISON: None. FINDINGS: Lungs are clear. Heart size is normal. "
          "IMPRESSION: Normal chest radiograph. NOTIFICATION: Called to the ward.")
  assert report_sentences(text) == ["Lungs are clear.", "Heart size is normal.", "Normal chest radiograph."]


def test_lowercase_generic_word_at_a_wrapped_line_start_is_not_a_heading():
  text = "FINDINGS: Opacity is unchanged compared to the prior\nstudy: there is no new consolidation."
  assert report_sentences(text) == [
      "Opacity is unchanged compared to the prior study: there is no new consolidation."]


def test_numbered_list_inline_and_crlf():
  text = "IMPRESSION:\r\n1. Small left effusion. 2. Mild edema is present. 3) No pneumothorax is seen.\r\n"
  assert report_sentences(text) == ["Small left effusion.", "Mild edema is present.",
                                    "No pneumothorax is seen."]


def test_bullets_and_a_number_at_a_sentence_end_are_not_list_items():
  text = "FINDINGS:\n- Lines: NG tube in the stomach.\n- Nodule measures 2. The lungs are otherwise clear."
  assert report_sentences(text) == ["Lines: NG tube in the stomach.", "Nodule measures 2.",
                                    "The lungs are otherwise clear."]


def test_abbreviations_do_not_split_but_a_capitalised_sentence_after_am_does():
  text = ("FINDINGS: Dr. ___ reviewed the film at 8 a.m. The tube is 3 cm above the carina, i.e. in good "
          "position vs. the prior film.")
  assert report_sentences(text) == ["Dr. reviewed the film at 8 a.m.",
                                    "The tube is 3 cm above the carina, i.e. in good position vs. the prior "
                                    "film."]


@pytest.mark.parametrize("min_tokens, expected", [
    (3, ["Right IJ line tip at cavoatrial junction."]),
    (2, ["Right IJ line tip at cavoatrial junction.", "No pneumothorax."]),
    (7, ["Right IJ line tip at cavoatrial junction."]),  # exactly 7 word tokens
    (8, []),
])
def test_min_tokens(min_tokens, expected):
  text = "FINDINGS: Right IJ line tip at cavoatrial junction.  No pneumothorax.\nIMPRESSION: None."
  assert report_sentences(text, min_tokens=min_tokens) == expected


@pytest.mark.parametrize("text", [
    "", "   \n\t ", "___ ___", "FINDINGS:\nIMPRESSION:\n", "INDICATION: cough.\nCOMPARISON: none.",
    "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n TECHNIQUE: PA and lateral views of the chest.",
    "1.\n2.\n3.", "...", "FINDINGS: ___. ___.",
])
def test_malformed_reports_give_no_sentences(text):
  assert report_sentences(text) == []


def test_non_string_is_a_clear_error():
  with pytest.raises(TypeError, match="must be a str"):
    report_sentences(b"FINDINGS: clear")
  with pytest.raises(TypeError, match="must be a str"):
    split_sentences(None)


@pytest.mark.parametrize("report", [STANDARD, OLD_STYLE, WET_READ_IMPRESSION_ONLY, FINDINGS_ONLY,
                                    NO_HEADINGS])
def test_sentences_are_clean_lines(report):
  sentences = report_sentences(report)
  assert sentences
  for sentence in sentences:
    assert sentence == " ".join(sentence.split())  # no newline, tab or double space
    assert "___" not in sentence and "_" not in sentence
    assert sentence[:1].isalpha()
    assert len(sentence.split()) >= 3


def test_split_sentences_has_no_section_logic():
  assert split_sentences("INDICATION: the heart is large. The lungs are clear.") == [
      "INDICATION: the heart is large.", "The lungs are clear."]
