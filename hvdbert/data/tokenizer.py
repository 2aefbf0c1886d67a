"""WordPiece tokenizers: trained on a corpus with HF `tokenizers`, or loaded from a directory.

A tokenizer is stored beside prepared data as a transformers `BertTokenizerFast` directory
(tokenizer.json plus its config), so pretrain and export use exactly the one the data was made with.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from hvdbert.errors import UsageError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(documents: Iterable[str], vocab_size: int, lowercase: bool = True):
    """Train a BERT-style WordPiece tokenizer; returns a transformers BertTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # BertNormalizer puts spaces around CJK characters, so each becomes its own word, as in BERT.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, continuing_subword_prefix="##"
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=lowercase)


def load_tokenizer(directory: str | Path):
    """Load a tokenizer directory (for example a downloaded bert-base-uncased) without any download."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"tokenizer directory not found: {directory}")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise UsageError(
            f"{directory} is not a tokenizer directory: it has neither tokenizer.json nor vocab.txt"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    except Exception as error:  # a malformed file: the Rust parser raises a bare Exception, others KeyError
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"{directory}: cannot load the tokenizer ({type(error).__name__}: {first_line}); "
                         "pass a transformers tokenizer directory (tokenizer.json or vocab.txt)") from None
    missing = [t for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]") if tokenizer.convert_tokens_to_ids(t) is None
               or tokenizer.convert_tokens_to_ids(t) == tokenizer.unk_token_id]
    if missing:
        raise UsageError(f"{directory}: the tokenizer lacks BERT's special tokens {', '.join(missing)}")
    return tokenizer


def tokenizer_hash(directory: str | Path) -> str:
    """sha256 over the files that define the vocabulary and the tokenization rules."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "vocab.txt"):
        path = directory / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
