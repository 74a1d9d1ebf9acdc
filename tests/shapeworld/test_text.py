"""Captions, questions and their parsing back into objects and yes/no."""

from shapeworld.text import caption, parse_objects, parse_yes_no, question


def test_caption_and_question_format():
    assert caption([("red", "circle"), ("blue", "square")]) == "a red circle and a blue square ."
    assert caption([("green", "star")]) == "a green star ."
    assert question(("red", "circle")) == "is there a red circle ?"


def test_parse_objects_finds_colour_shape_pairs_in_order():
    assert parse_objects("a red circle and a blue square .") == [("red", "circle"), ("blue", "square")]
    assert parse_objects("a red and a circle. a green star.") == [("green", "star")]
    assert parse_objects("") == []


def test_parse_yes_no():
    assert parse_yes_no("yes") is True
    assert parse_yes_no(" No.") is False
    assert parse_yes_no("a red circle") is None
    assert parse_yes_no("") is None
