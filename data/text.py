"""Caption and question normalisation (docs/data.md, "Text normalisation")."""
import re

_CAPTION_PUNCT = re.compile(r'[!"()*#~]')
_QUESTION_PUNCT = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s{2,}")
MAX_QUESTION_WORDS = 50


def pre_caption(caption: str, max_words: int = 50) -> str:
    text = _CAPTION_PUNCT.sub(" ", caption.lower())
    text = _SPACES.sub(" ", text).strip()
    return " ".join(text.split(" ")[:max_words])


def pre_question(question: str, max_words: int = MAX_QUESTION_WORDS) -> str:
    text = _QUESTION_PUNCT.sub("", question.lower()).rstrip(" ")
    return " ".join(text.split(" ")[:max_words])
