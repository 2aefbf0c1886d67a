"""WordPiece tokenizers: trained on a corpus with HF `tokenizers`, or loaded from a directory.

A tokenizer is stored beside prepared data as a transformers `BertTokenizerFast` directory
(tokenizer.json plus its config), so pretrain and export use exactly the one the data was made with.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable

from hvdbert.errors import UsageError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(documents: Callable[[], Iterable[str]] | Iterable[str], vocab_size: int,
                    lowercase: bool = True):
    """Train a BERT-style WordPiece tokenizer; returns a transformers BertTokenizerFast.

    `documents` is read twice: a function returning a fresh iterable of them each call (how prepare
    streams a large corpus), or a collection; a one-shot iterator is first put in a list.

    The result is the same file, byte for byte, for the same documents, in every process and on every
    machine. HF tokenizers' trainer alone does not give that: it gives each continuing-subword
    character (`##e`) its id in the iteration order of a hash map that is seeded at random per
    process, and it breaks ties between equally frequent merges by those ids, so two runs chose
    different merges (issue: 249 of 4096 tokens at other ids, some tokens different). Registering
    every `##c` up front, in code-point order, fixes those ids, hence every tie-break; the
    registration goes through the trainer's special tokens (the only ids it assigns before its
    hash-map pass), and the tokenizer is then rebuilt from the trained vocabulary so that only
    BERT's five tokens are special."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    if not callable(documents):
        collection = documents if iter(documents) is not documents else list(documents)
        documents = lambda: collection  # noqa: E731  (read twice)
    # BertNormalizer puts spaces around CJK characters, so each becomes its own word, as in BERT.
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    continuing = _continuing_subwords(documents(), normalizer, pre_tokenizer)

    trainer_tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainer_tokenizer.normalizer = normalizer
    trainer_tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + continuing, min_frequency=2,
        continuing_subword_prefix="##"
    )
    trainer_tokenizer.train_from_iterator(documents(), trainer=trainer)

    tokenizer = Tokenizer(models.WordPiece(trainer_tokenizer.get_vocab(), unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(SPECIAL_TOKENS)  # already in the vocabulary: marks them special
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=lowercase)


def _continuing_subwords(documents: Iterable[str], normalizer, pre_tokenizer) -> list[str]:
    """`##c` for every character c of the normalized documents that the pre-tokenizer can leave
    inside a word (not whitespace, punctuation or CJK, which always stand alone), in code-point
    order. BertNormalizer works character by character (lowercase, accents, control characters, CJK
    spacing), so normalizing each distinct raw character gives the normalized alphabet in one cheap
    pass (set.update runs at C speed)."""
    raw: set[str] = set()
    for document in documents:
        raw.update(document)
    alphabet = {c for r in raw for c in normalizer.normalize_str(r)}
    inside = [c for c in alphabet if [w for w, _ in pre_tokenizer.pre_tokenize_str("a" + c)] == ["a" + c]]
    return ["##" + c for c in sorted(inside)]


def load_any_tokenizer(directory: str | Path,
                       remedy: str = "pass a transformers tokenizer directory (tokenizer.json or vocab.txt)"):
    """Load the tokenizer of a directory without any download, whatever its special tokens; `remedy`
    ends the refusal of a directory without one. Where its files are missing, transformers would
    build a vocabulary of the special tokens alone and read every word as [UNK]: refused."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"tokenizer directory not found: {directory}")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise UsageError(f"{directory} is not a tokenizer directory: it has neither tokenizer.json nor vocab.txt; "
                         f"{remedy}")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    except Exception as error:  # a malformed file: the Rust parser raises a bare Exception, others KeyError
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"{directory}: cannot load the tokenizer ({type(error).__name__}: {first_line}); "
                         f"{remedy}") from None


def load_tokenizer(directory: str | Path):
    """Load a BERT-style tokenizer directory (for example a downloaded bert-base-uncased) without any
    download."""
    tokenizer = load_any_tokenizer(directory)
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
