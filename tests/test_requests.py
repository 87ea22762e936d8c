import pytest

from editbank import EditRequest


def test_normalisation_and_round_trip():
    r = EditRequest(prompt="The capital of Arvelia is  ", target="Dunmore", subject="Arvelia",
                    rephrases=["Arvelia's capital is"], locality=[("The sky is", "blue")])
    assert r.prompt == "The capital of Arvelia is"
    assert r.target == " Dunmore"
    assert r.locality == [("The sky is", " blue")]
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "kwargs, exc, field",
    [
        (dict(prompt="", target="x"), ValueError, "prompt"),
        (dict(prompt="   ", target="x"), ValueError, "prompt"),
        (dict(prompt="p", target=" \n "), ValueError, "target"),
        (dict(prompt=3, target="x"), TypeError, "prompt"),
        (dict(prompt="p", target=["x"]), TypeError, "target"),
        (dict(prompt="The capital is", target="x", subject="Arvelia"), ValueError, "subject"),
        (dict(prompt="p", target="x", rephrases="one string"), TypeError, "rephrases"),
        (dict(prompt="p", target="x", locality=[("only prompt",)]), TypeError, "locality"),
        (dict(prompt="p", target="x", locality=[("q", "")]), ValueError, "locality"),
        (dict(prompt="p", target="x", meta={"f": object()}), TypeError, "meta"),
    ],
)
def test_bad_requests_name_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=field):
        EditRequest(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown"):
        EditRequest.from_dict({"prompt": "p", "target": "t", "colour": "red"})
