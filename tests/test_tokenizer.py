"""Tokenizer: reproduces the ids stored by the original code and agrees with transformers."""
import pytest
import torch

from conftest import load_reference
from models.tokenizer import DEFAULT_VOCAB, basic_tokenize, init_tokenizer, wordpiece


@pytest.fixture(scope="module")
def tokenizer():
    return init_tokenizer()


VARIED_TEXTS = [
    "a man is playing a guitar on stage.",
    "A dog runs across the GRASS!",
    "Héllo, naïve café-goers: don't panic?!",
    "北京欢迎你 and 東京",
    "supercalifragilisticexpialidocious " + "x" * 101 + " " + "y" * 100,
    "  tabs\tand\nnewlines\r\n  and   spaces ",
    "numbers 3.14, 1,000,000 and 42nd; $5 @ 50% #tag ^_^ ~{x}|<y>",
    "MiXeD CaSe WoRdS with ÄÖÜ and ß",
    "unaffable unhappiness xyzzyq",
    "",
    "zero\u200bwidth\u0000null\ufffdbad control\u0007char",
    "emoji 🙂 and dashes — – ‐ “quotes” «fr»",
]


def test_bundled_vocab_sizes_and_special_ids(tokenizer):
    assert len(tokenizer) == 30524
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 101, 102)
    assert (tokenizer.bos_token_id, tokenizer.enc_token_id) == (30522, 30523)


def test_path_may_be_folder_or_file_and_missing_is_clear(tmp_path):
    (tmp_path / "vocab.txt").write_text(DEFAULT_VOCAB.read_text(encoding="utf-8"), encoding="utf-8")
    assert len(init_tokenizer(tmp_path)) == 30524
    assert len(init_tokenizer(tmp_path / "vocab.txt")) == 30524
    with pytest.raises(FileNotFoundError, match="vocab"):
        init_tokenizer(tmp_path / "nowhere")


def test_basic_and_wordpiece_rules():
    assert basic_tokenize("Héllo,World!") == ["hello", ",", "world", "!"]
    assert basic_tokenize("中文x") == ["中", "文", "x"]
    vocab = {"un": 0, "##aff": 1, "##able": 2}
    assert wordpiece("unaffable", vocab) == ["un", "##aff", "##able"]
    assert wordpiece("unaffablex", vocab) == ["[UNK]"]
    assert wordpiece("a" * 101, {"a": 0, "##a": 1}) == ["[UNK]"]


@pytest.fixture(scope="module")
def compact_tokenizer(fixtures_dir):
    """The fixtures' tokenizer: the first 3000 BERT tokens, then [DEC] and [ENC]."""
    return init_tokenizer(fixtures_dir / "vocab.txt")


def test_compact_vocab_appends_blip_tokens(compact_tokenizer):
    assert len(compact_tokenizer) == 3002
    assert (compact_tokenizer.bos_token_id, compact_tokenizer.enc_token_id) == (3000, 3001)


@pytest.mark.parametrize("name, kwargs, ids_key, mask_key, text_key", [
    ("retrieval_ref.pt", dict(padding="max_length", truncation=True, max_length=16),
     "input_ids", "attention_mask", "captions"),
    ("pretrain_ref.pt", dict(padding="max_length", truncation=True, max_length=30),
     "input_ids", "attention_mask", "captions"),
    ("vqa_ref.pt", dict(padding="longest", truncation=True, max_length=35),
     "question_input_ids", "question_attention_mask", "questions"),
    ("vqa_ref.pt", dict(padding="longest"), "answer_input_ids", "answer_attention_mask", "answer_list"),
])
def test_reproduces_reference_ids(compact_tokenizer, fixtures_dir, name, kwargs, ids_key, mask_key, text_key):
    ref = load_reference(fixtures_dir / name)
    tokenizer = compact_tokenizer
    assert (ref["bos_token_id"], ref["enc_token_id"]) == (tokenizer.bos_token_id, tokenizer.enc_token_id)
    out = tokenizer(ref[text_key], return_tensors="pt", **kwargs)
    expected_ids = ref[ids_key].clone()
    # The original replaced [CLS] by [ENC]/[DEC] after tokenising; undo that to compare.
    expected_ids[:, 0] = tokenizer.cls_token_id
    assert torch.equal(out.input_ids, expected_ids)
    assert torch.equal(out["attention_mask"], ref[mask_key])


def test_padding_truncation_and_return_types(tokenizer):
    out = tokenizer(["a b c d e", "a"], padding=True, truncation=True, max_length=4, return_tensors="pt")
    assert out.input_ids.tolist() == [[101, 1037, 1038, 102], [101, 1037, 102, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    single = tokenizer("a b")
    assert single.input_ids == [101, 1037, 1038, 102] and single.attention_mask == [1, 1, 1, 1]
    assert tokenizer(["a", "a b"]).input_ids == [[101, 1037, 102], [101, 1037, 1038, 102]]
    with pytest.raises(ValueError, match="padding"):
        tokenizer(["a", "a b"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding"):
        tokenizer("a", padding="sideways")


def test_special_token_strings_and_decode(tokenizer):
    ids = tokenizer("[DEC] a dog's toy, isn't it?").input_ids
    assert ids[1] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a dog's toy, isn't it?"
    assert tokenizer.decode(torch.tensor([101, 2019, 14477, 20961, 3468, 102])) == "[CLS] an unaffable [SEP]"


def _transformers_tokenizer(kind):
    """transformers' BERT tokenizer (Python or Rust-backed); the constructors differ between 4.x and 5.x."""
    transformers = pytest.importorskip("transformers")
    major = int(transformers.__version__.split(".")[0])
    vocab = str(DEFAULT_VOCAB)
    if kind == "python" and major >= 5:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
        return BertTokenizerLegacy(vocab_file=vocab)
    if kind == "python":
        return transformers.BertTokenizer(vocab_file=vocab)
    return transformers.BertTokenizerFast(vocab=vocab) if major >= 5 else transformers.BertTokenizerFast(vocab_file=vocab)


@pytest.mark.parametrize("kind", ["python", "rust"])
def test_agrees_with_transformers(tokenizer, kind):
    reference = _transformers_tokenizer(kind)
    reference.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    for text in VARIED_TEXTS:
        assert tokenizer.tokenize(text) == reference.tokenize(text), text
        assert tokenizer(text).input_ids == reference(text).input_ids, text
    batch = dict(padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    ours, theirs = tokenizer(VARIED_TEXTS, **batch), reference(VARIED_TEXTS, **batch)
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert len(reference) == len(tokenizer)
    ids = tokenizer("A dog's toy, isn't it? [ENC] Héllo").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
