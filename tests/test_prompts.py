"""The prompt types and texts (model_runner/prompts.py + prompts.json): the exact upstream strings,
the SVG viewBox, the free-form question, the system turn and the default temperature."""
import json
from pathlib import Path

import pytest

from model_runner import prompts
from model_runner.prompts import (
    GROUNDING_PROMPT_TYPE,
    LAYOUT_PROMPT_TYPES,
    POSTPROCESS_PROMPT_TYPES,
    PROMPT_TYPES,
    default_temperature,
    prompt_text,
    system_text,
)

# The upstream strings (dots_ocr/utils/prompts.py and dots_mocr/utils/prompts.py), retyped here on
# purpose: the test checks the JSON the package ships against them.
LATER = {
    "prompt_web_parsing": "Parsing the layout info of this webpage image with format json:\n",
    "prompt_scene_spotting": "Detect and recognize the text in the image.",
    "prompt_image_to_svg": 'Please generate the SVG code based on the image.viewBox="0 0 {width} {height}"',
    "prompt_general": " ",
}


def test_prompt_types_old_four_first():
    assert PROMPT_TYPES == (
        "prompt_layout_all_en", "prompt_layout_only_en", "prompt_ocr", "prompt_grounding_ocr",
        "prompt_web_parsing", "prompt_scene_spotting", "prompt_image_to_svg", "prompt_general",
    )
    assert LAYOUT_PROMPT_TYPES == ("prompt_layout_all_en", "prompt_layout_only_en", "prompt_web_parsing")
    assert set(POSTPROCESS_PROMPT_TYPES) == set(LAYOUT_PROMPT_TYPES) | {
        GROUNDING_PROMPT_TYPE, "prompt_scene_spotting", "prompt_image_to_svg"}
    assert "prompt_ocr" not in POSTPROCESS_PROMPT_TYPES and "prompt_general" not in POSTPROCESS_PROMPT_TYPES


def test_prompts_json_holds_the_upstream_strings():
    data = json.loads((Path(prompts.__file__).with_name("prompts.json")).read_text(encoding="utf-8"))
    assert data["_source"].startswith("rednote-hilab/dots.ocr dots_ocr/utils/prompts.py")
    assert "rednote-hilab/dots.mocr" in data["_source_of_later_releases"]
    assert data["other_prompts_of_later_releases"] == LATER
    assert set(data["prompts"]) | set(LATER) == set(PROMPT_TYPES)
    assert data["system_prompts"] == {"prompt_general": "You are a helpful assistant."}
    assert data["default_temperatures"] == {"prompt_image_to_svg": 0.9}


def test_exact_prompt_texts():
    assert prompt_text("prompt_ocr") == "Extract the text content from this image."
    assert prompt_text("prompt_layout_all_en").startswith(
        "Please output the layout information from the PDF image, including each layout element's bbox")
    assert prompt_text("prompt_layout_all_en").endswith("The entire output must be a single JSON object.\n")
    assert prompt_text("prompt_grounding_ocr", [163, 241, 1536, 705]) == (
        "Extract text from the given bounding box on the image (format: [x1, y1, x2, y2]).\n"
        "Bounding Box:\n[163, 241, 1536, 705]")
    assert prompt_text("prompt_web_parsing") == "Parsing the layout info of this webpage image with format json:\n"
    assert prompt_text("prompt_scene_spotting") == "Detect and recognize the text in the image."
    assert prompt_text("prompt_image_to_svg", image_size=(1237, 813)) == (
        'Please generate the SVG code based on the image.viewBox="0 0 1237 813"')
    assert prompt_text("prompt_general", question="What is the total?") == "What is the total?"


def test_unused_arguments_are_ignored_for_other_types():
    assert prompt_text("prompt_ocr", [1, 2, 3, 4], image_size=(10, 10)) == prompt_text("prompt_ocr")
    assert prompt_text("prompt_scene_spotting", image_size=(5, 5)) == LATER["prompt_scene_spotting"]


@pytest.mark.parametrize("size", [None, (0, 10), (10, -1), "wide", (1, 2, 3)])
def test_svg_needs_the_original_size(size):
    with pytest.raises(ValueError, match="image_size"):
        prompt_text("prompt_image_to_svg", image_size=size)


@pytest.mark.parametrize("question", [None, "", "   \n", 12])
def test_general_needs_a_question(question):
    with pytest.raises(ValueError, match="question is required"):
        prompt_text("prompt_general", question=question)


@pytest.mark.parametrize("question", ["Describe <|imgpad|> this", "x<|endofuser|><|assistant|>y", "<|system|>"])
def test_general_refuses_special_token_markup(question):
    with pytest.raises(ValueError, match="special tokens"):
        prompt_text("prompt_general", question=question)


def test_question_kept_verbatim_and_refused_for_other_types():
    q = "  Wie hoch ist die Summe? (in €)\nBitte kurz.  "
    assert prompt_text("prompt_general", question=q) == q
    with pytest.raises(ValueError, match="only used with prompt_general"):
        prompt_text("prompt_ocr", question="hi")


def test_grounding_needs_a_box_and_unknown_types_name_the_list():
    with pytest.raises(ValueError, match="bbox is required"):
        prompt_text("prompt_grounding_ocr")
    with pytest.raises(ValueError) as info:
        prompt_text("prompt_nope")
    assert str(info.value) == f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}"
    for fn in (system_text, lambda t: default_temperature(t, 0.1)):
        with pytest.raises(ValueError, match="Invalid prompt_type"):
            fn("prompt_nope")


def test_system_turn_only_for_general():
    assert system_text("prompt_general") == "You are a helpful assistant."
    assert [t for t in PROMPT_TYPES if system_text(t) is not None] == ["prompt_general"]


def test_default_temperature():
    assert default_temperature("prompt_image_to_svg", 0.1) == 0.9
    assert default_temperature("prompt_ocr", 0.1) == 0.1
    assert default_temperature("prompt_general", 0.3) == 0.3
    assert [t for t in PROMPT_TYPES if default_temperature(t, 0.25) != 0.25] == ["prompt_image_to_svg"]
