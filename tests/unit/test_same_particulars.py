"""same_particulars: near-duplicate statements agree on numbers, dates, negations and names."""

from __future__ import annotations

import pytest

from halldyll_ray.textproc import same_particulars


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("The user is 30 years old", "The user is 31 years old"),
        ("I have two cats", "I have three cats"),
        ("Rent is 1,200 euros", "Rent is 1,250 euros"),
        ("Ada moved in May", "Ada moved in June"),
        ("Meeting on Monday", "Meeting on Tuesday"),
        ("I like coffee", "I don't like coffee"),
        ("I like coffee", "I don’t like coffee"),
        ("I eat meat", "I never eat meat"),
        ("Ada's sister is Maria", "Ada's sister is Marta"),
        ("The user lives in Paris", "The user lives in Lyon"),
        ("I was born in 1990", "I was born in 1991"),
        ("The user is forty years old", "The user is forty-one years old"),
        ("Ada is 20", "Ada is thirty"),
        ("The party is on the 5th", "The party is on the sixth"),
        ("The user lives in Paris", "The user lives in Paris, France"),
        # What the encoder cannot read: tokens, passwords, one long word for another.
        (
            "My github token is ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZaBcDeFgHiJ",
            "My github token is ghp_zYxWvUtSrQpOnMlKjIhGfEdCbAzYxWvUtSrQ",
        ),
        ("The wifi password is " + "ab" * 60, "The wifi password is " + "cd" * 60),
        ("q" * 150, "a\uffffb\ufffe"),
        ("a\uffffb\ufffe", "y" * 2000),
        ("Ada works at NASA", "Ada works at IBM"),  # acronyms are names
        # An identifier's letter case is part of it.
        ("My wifi password is HelloWorld2024", "My wifi password is helloworld2024"),
        ("My token is ghp_aBcDeF", "My token is ghp_AbCdEf"),
        ("The code is " + "ABCD" * 6, "The code is " + "abcd" * 6),
        # A difference past what the encoder sees of a long statement.
        (
            " ".join(["Ada keeps a list of plants"] * 12) + " and apples",
            " ".join(["Ada keeps a list of plants"] * 12) + " and pears",
        ),
    ],
)
def test_statements_that_differ_in_a_particular_are_different(a: str, b: str) -> None:
    assert not same_particulars(a, b)
    assert not same_particulars(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Ada's favourite colour is teal", "Ada's favorite color is teal"),
        ("I am vegetarian", "I'm a vegetarian"),
        ("The user is 31 years old", "the user is 31 years of age"),
        ("I may visit Rome", "I might visit Rome"),  # "may" the verb, not the month
        ("Ada likes green tea", "Ada really likes green tea"),
        ("Ada likes jazz", "  ada LIKES jazz!  "),  # capitals for emphasis are not a name
        # A name moved to or from the start of the sentence is the same name.
        ("Ada drinks green tea every morning", "Every morning, Ada drinks green tea"),
        ("Alice is my sister", "My sister is Alice"),
        # A number in words or digits is the same number.
        ("The user is 40 years old", "The user is forty years old"),
        ("Ada's birthday is on the 5th", "Ada's birthday is on the fifth"),
        ("Ada is twenty", "Ada is 20"),
        ("Ada turns forty-one", "Ada turns 41"),
        ("My token is ghp_aBcD", "my token is ghp_aBcD"),  # the same token
        ("Ada works at NASA", "At NASA works Ada"),
        (
            " ".join(["Ada keeps a list of plants"] * 12),
            " ".join(["ada keeps a list of plants"] * 12) + ".",
        ),
        ("", ""),
    ],
)
def test_paraphrases_with_the_same_particulars_agree(a: str, b: str) -> None:
    assert same_particulars(a, b)
