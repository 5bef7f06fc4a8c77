"""Offline BERT (uncased) WordPiece tokenizer with BLIP's two extra tokens.

Written here so the project runs without a model hub and without depending on
how a given transformers release builds its tokenizers. It reproduces
``transformers.BertTokenizer(do_lower_case=True)``: basic tokenisation (clean
text, split CJK characters, lower-case, strip accents, split punctuation), then
greedy longest-match-first WordPiece. BLIP appends ``[DEC]`` (the decoder's bos
token, id 30522) and ``[ENC]`` (prefix of image-grounded text, id 30523).
"""
import re
import unicodedata
from pathlib import Path

import torch

DEFAULT_VOCAB = Path(__file__).resolve().parent / "vocab" / "bert-base-uncased-vocab.txt"
BLIP_EXTRA_TOKENS = ("[DEC]", "[ENC]")
CORE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BERT treats a word longer than this as unknown rather than splitting it.
MAX_CHARS_PER_WORD = 100
# Used when truncating without an explicit max_length, as BERT's model_max_length.
MODEL_MAX_LENGTH = 512


def _is_whitespace(char):
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char):
    # Tab/newline/return count as whitespace, not control.
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char):
    # ASCII symbols such as '$' or '^' are not Unicode punctuation but BERT splits them.
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def clean_text(text):
    """Drop NUL, U+FFFD and control characters; map every whitespace to a space."""
    out = []
    for char in text:
        if ord(char) in (0, 0xFFFD) or _is_control(char):
            continue
        out.append(" " if _is_whitespace(char) else char)
    return "".join(out)


def strip_accents(text):
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def split_punctuation(word):
    """Each punctuation character becomes its own piece."""
    pieces, current = [], []
    for char in word:
        if _is_punctuation(char):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(char)
        else:
            current.append(char)
    if current:
        pieces.append("".join(current))
    return pieces


def basic_tokenize(text):
    """Whitespace/punctuation split of lower-cased, accent-free text."""
    text = clean_text(text)
    # CJK ideographs carry no spaces between words, so each becomes a word.
    text = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in text)
    # NFC first so that the same character written with different code points splits alike.
    words = unicodedata.normalize("NFC", text).split()
    tokens = []
    for word in words:
        tokens.extend(split_punctuation(strip_accents(word.lower())))
    return tokens


def wordpiece(word, vocab, unk_token="[UNK]"):
    """Greedy longest-match-first split; a word with an unmatched piece is unknown."""
    if len(word) > MAX_CHARS_PER_WORD:
        return [unk_token]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:
            return [unk_token]
        pieces.append(piece)
        start = end
    return pieces


def load_vocab(vocab_file):
    with open(vocab_file, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    return {token: index for index, token in enumerate(tokens)}


def resolve_vocab_file(path=None):
    """``None`` -> bundled vocab; a folder -> its vocab.txt; otherwise the file itself."""
    vocab_file = DEFAULT_VOCAB if path is None else Path(path)
    if vocab_file.is_dir():
        vocab_file = vocab_file / "vocab.txt"
    if not vocab_file.is_file():
        raise FileNotFoundError(
            f"tokenizer vocab not found: {vocab_file} (expected a BERT vocab.txt file or a folder containing one)")
    return vocab_file


class BatchEncoding(dict):
    """Dict of ``input_ids``/``attention_mask`` that also allows attribute access, like HF's."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        return BatchEncoding({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.items()})


# Decoding joins pieces with spaces; BERT's clean-up then re-attaches punctuation and contractions.
_CLEANUP_RULES = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class BertTokenizer:
    def __init__(self, vocab_file=DEFAULT_VOCAB):
        self.vocab = load_vocab(resolve_vocab_file(vocab_file))
        missing = [t for t in CORE_SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"vocab file {vocab_file} lacks the BERT special tokens {missing}")
        for token in BLIP_EXTRA_TOKENS:
            self.vocab.setdefault(token, len(self.vocab))
        self.ids_to_tokens = {index: token for token, index in self.vocab.items()}
        self.special_tokens = CORE_SPECIAL_TOKENS + BLIP_EXTRA_TOKENS
        self.special_ids = {self.vocab[t] for t in self.special_tokens}
        # Special-token strings inside a text map to their ids instead of being split, as in HF.
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
        self.pad_token_id = self.vocab["[PAD]"]
        self.unk_token_id = self.vocab["[UNK]"]
        self.cls_token_id = self.vocab["[CLS]"]
        self.sep_token_id = self.vocab["[SEP]"]
        self.mask_token_id = self.vocab["[MASK]"]
        self.bos_token_id = self.vocab["[DEC]"]
        self.enc_token_id = self.vocab["[ENC]"]

    def __len__(self):
        return len(self.vocab)

    def tokenize(self, text):
        tokens = []
        for chunk in self._special_pattern.split(text):
            if chunk in self.special_tokens:
                tokens.append(chunk)
                continue
            for word in basic_tokenize(chunk):
                tokens.extend(wordpiece(word, self.vocab))
        return tokens

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        return [self.ids_to_tokens.get(int(i), "[UNK]") for i in ids]

    def encode(self, text, max_length=None):
        """[CLS] text [SEP], truncating the text so the whole fits in ``max_length``."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if max_length is not None:
            ids = ids[:max(max_length - 2, 0)]
        return [self.cls_token_id] + ids + [self.sep_token_id]

    def __call__(self, text, padding=False, truncation=None, max_length=None, return_tensors=None):
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer input must be a string or a list of strings")
        if padding is True:
            padding = "longest"
        if padding not in (False, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be True/False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        # As in HF: truncation=None truncates only when a max_length is given.
        if truncation is None:
            truncation = max_length is not None
        limit = (max_length or MODEL_MAX_LENGTH) if truncation else None
        sequences = [self.encode(t, limit) for t in texts]

        if padding == "longest":
            target = max(len(s) for s in sequences)
        elif padding == "max_length":
            target = max_length or MODEL_MAX_LENGTH
        else:
            target = None
        masks = [[1] * len(s) for s in sequences]
        if target is not None:
            masks = [m + [0] * (target - len(m)) for m in masks]
            sequences = [s + [self.pad_token_id] * (target - len(s)) for s in sequences]

        if return_tensors == "pt":
            if len({len(s) for s in sequences}) > 1:
                raise ValueError("sequences have different lengths: use padding=True or 'max_length' "
                                 "with return_tensors='pt'")
            return BatchEncoding(input_ids=torch.tensor(sequences, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if single:
            return BatchEncoding(input_ids=sequences[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=sequences, attention_mask=masks)

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=True):
        if torch.is_tensor(ids):
            ids = ids.tolist()
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        text = " ".join(self.convert_ids_to_tokens(ids)).replace(" ##", "").strip()
        if clean_up_tokenization_spaces:
            for before, after in _CLEANUP_RULES:
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences, **kwargs):
        return [self.decode(ids, **kwargs) for ids in sequences]


def init_tokenizer(path=None):
    """BLIP's tokenizer: BERT uncased + [DEC] (bos) + [ENC]. ``path``: vocab file or folder, None = bundled."""
    return BertTokenizer(resolve_vocab_file(path))
