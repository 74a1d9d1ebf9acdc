"""The words of ShapeWorld: captions, questions, answers, and parsing object mentions back out."""

from __future__ import annotations

from shapeworld.world import COLOURS, SHAPES, Obj, phrase

CAPTION_PROMPT = "describe the image ."
YES, NO = "yes", "no"


def caption(objects: list[Obj]) -> str:
    """'a red circle and a blue square .' (objects in reading order)."""
    return " and ".join(f"a {phrase(o)}" for o in objects) + " ."


QUESTION = "is there a {} ?"  # filled with an object's phrase


def question(obj: Obj) -> str:
    return QUESTION.format(phrase(obj))


def no_answer(asked: Obj, objects: list[Obj]) -> str:
    """'no , there is a red square .': a no that names the present objects sharing the asked colour or
    shape (a plain 'no' when none does)."""
    near = [o for o in objects if o[0] == asked[0] or o[1] == asked[1]]
    return f"{NO} , there is {caption(near)}" if near else NO


# JSON answers ({"objects": ["red square", ...]}): raw tokens (no word mark) in the tokenizer's unused slots, so
# that a grammar (xgrammar reads token strings raw) can write the JSON the 48 words cannot: an opening, a
# string opened on each colour, a string closed with a comma or with the end of the list and object. Shapes
# stay word tokens ("▁square"), which detokenize as " square": the string reads "red square".
JSON_OPEN, JSON_NEXT, JSON_CLOSE = '{"objects":[', '",', '"]}'
JSON_TOKENS: tuple[str, ...] = (JSON_OPEN, *(f'"{c}' for c in COLOURS), JSON_NEXT, JSON_CLOSE)
# What a grammar asks of that JSON: a free-string list (the grammar sees "red▁square", so an enum of
# "red square" can never match the word tokens).
OBJECTS_SCHEMA = {"type": "object", "properties": {"objects": {"type": "array", "items": {"type": "string"},
                                                               "maxItems": 6}},
                  "required": ["objects"], "additionalProperties": False}


def json_answer(objects: list[Obj]) -> str:
    """'{"objects":["red circle","blue square"]}' (objects in reading order, as ``caption`` lists them)."""
    return JSON_OPEN + JSON_NEXT.join(f'"{phrase(o)}' for o in objects) + JSON_CLOSE


def parse_objects(text: str) -> list[Obj]:
    """Object mentions in generated text, in order (a colour word followed by a shape word)."""
    words = text.replace(".", " . ").replace("?", " ? ").replace(",", " , ").split()
    found = []
    for w0, w1 in zip(words, words[1:]):
        if w0 in COLOURS and w1 in SHAPES:
            found.append((w0, w1))
    return found


def parse_yes_no(text: str) -> bool | None:
    """True for yes, False for no, None when the answer is neither."""
    words = text.strip().lower().split()
    if not words:
        return None
    first = words[0].strip(".,!?")
    return True if first == YES else False if first == NO else None


# Every word the models know (the tokenizer's vocabulary, beyond its special tokens).
VOCABULARY: tuple[str, ...] = (
    *COLOURS, *SHAPES,
    "a", "an", "and", "the", "is", "are", "there", "yes", "no", "describe", "image", "picture",
    "what", "which", "objects", "object", "shape", "shapes", "colour", "color", "in", "of", "this",
    "how", "many", "see", "you", "do", "can", "please", ".", "?", ",", "!", "USER:", "ASSISTANT:",
)
