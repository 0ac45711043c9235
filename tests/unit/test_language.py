"""Tests for halldyll_ray.language: offline detection and code normalisation."""

from __future__ import annotations

import pickle
import threading

import pytest

from halldyll_ray import language
from halldyll_ray.errors import InvalidInput
from halldyll_ray.language import detect_language, normalize_language_code

SENTENCES = [
    ("en", "Um, can you remind me to call the dentist tomorrow morning before nine?"),
    ("fr", "Je pense qu'on devrait revoir le budget avant de l'envoyer au service financier."),
    ("de", "Die Kinder waren nach der Reise total müde, also sind wir einfach zu Hause geblieben."),
    (
        "es",
        "El siguiente paso es desplegar la nueva versión y revisar los registros.",
    ),
    ("it", "Allora, volevo solo dire che la riunione è stata spostata a giovedì pomeriggio."),
    (
        "pt",
        "Acho que a gente deveria revisar o orçamento de novo antes de mandar para o financeiro.",
    ),
    ("nl", "Kun je me eraan herinneren dat ik morgenochtend voor negen uur de tandarts bel?"),
    ("ru", "Дети очень устали после поездки, так что мы просто остались дома и посмотрели фильм."),
    ("zh", "孩子们旅行回来以后都特别累，所以我们就待在家里看了一部电影。"),
    ("ja", "財務部に送る前に、もう一度予算を見直したほうがいいと思います。"),
    ("ar", "أعتقد أنه يجب علينا مراجعة الميزانية مرة أخرى قبل إرسالها إلى قسم المالية."),
    ("hi", "यात्रा के बाद बच्चे बहुत थक गए थे, इसलिए हम घर पर ही रहे और एक फिल्म देखी।"),
]


@pytest.mark.parametrize(("expected", "text"), SENTENCES, ids=[c for c, _ in SENTENCES])
def test_detects_language_of_sentences(expected: str, text: str) -> None:
    assert detect_language(text) == expected


@pytest.mark.parametrize(
    ("expected", "text"),
    [
        ("en", "See you tomorrow then."),
        ("fr", "Je suis en retard, désolé."),
        ("de", "Ich komme etwas später."),
        ("ja", "ごめん、遅れます。"),
    ],
)
def test_detects_language_of_short_utterances(expected: str, text: str) -> None:
    assert detect_language(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "123 456", "?!", "12:30 - 14:00", "a", "x 1"])
def test_returns_none_without_enough_letters(text: str) -> None:
    assert detect_language(text) is None


@pytest.mark.parametrize("text", ["ok", "hmm", "asdf qwer zxcv", "Okay okay okay"])
def test_returns_none_below_confidence(text: str) -> None:
    assert detect_language(text) is None


def test_result_is_lowercase_iso_639_1() -> None:
    code = detect_language("Kannst du mich daran erinnern, morgen früh den Zahnarzt anzurufen?")
    assert code is not None
    assert len(code) == 2
    assert code == code.lower()


def test_long_text_is_truncated_not_rejected() -> None:
    text = "Der nächste Schritt ist, die neue Version auszurollen. " * 500
    assert len(text) > language.MAX_DETECTION_CHARS
    assert detect_language(text) == "de"


def test_concurrent_first_use_loads_one_identifier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(language, "_identifier", None)
    results: list[str | None] = []
    lock = threading.Lock()

    def work() -> None:
        code = detect_language("Creo que deberíamos revisar el presupuesto otra vez.")
        with lock:
            results.append(code)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["es"] * 4
    first = language._get_identifier()
    assert language._get_identifier() is first


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("en", "en"),
        ("EN", "en"),
        ("Fr", "fr"),
        ("en-us", "en-US"),
        ("en-US", "en-US"),
        ("PT-br", "pt-BR"),
    ],
)
def test_normalize_accepts(given: str, expected: str) -> None:
    assert normalize_language_code(given) == expected


@pytest.mark.parametrize(
    "given",
    ["english", "e", "en_US_x", "12", "", "en_US", "en-", "en-USA", "eng", " en", "en\n", "é1"],
)
def test_normalize_rejects(given: str) -> None:
    with pytest.raises(InvalidInput) as info:
        normalize_language_code(given)
    assert info.value.field == "language"
    assert info.value.code == "invalid_input"


def test_normalize_error_pickles() -> None:
    with pytest.raises(InvalidInput) as info:
        normalize_language_code("english")
    copy = pickle.loads(pickle.dumps(info.value))
    assert isinstance(copy, InvalidInput)
    assert copy.fields["field"] == "language"
