"""WordPiece tokenisation from a BERT-style ``vocab.txt`` (the ``tokenizers`` package)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["WordPieceTokenizer"]


class WordPieceTokenizer:
    """Text -> wordpiece ids without special tokens, plus the ids ``meta.json`` records.

    ``lowercase`` should match the vocabulary (``bert-base-cased``, UNITER's, is cased).
    """

    def __init__(self, vocab_file: str | Path, lowercase: bool = False):
        from tokenizers import BertWordPieceTokenizer

        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"missing WordPiece vocabulary file: {path}")
        self.vocab_file = str(path)
        self.lowercase = lowercase
        self._tok = BertWordPieceTokenizer(self.vocab_file, lowercase=lowercase, strip_accents=lowercase)
        self.vocab = self._tok.get_vocab()
        for tok in ("[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            if tok not in self.vocab:
                raise ValueError(f"{path}: vocabulary has no {tok} token")

    def __call__(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def token_id(self, token: str) -> int:
        return int(self.vocab[token])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def meta(self) -> dict:
        """The tokenizer fields of a txt_db ``meta.json``."""
        first = self.vocab.get("!")
        if first is None:  # vocabularies without punctuation: first id after the special tokens
            first = 1 + max(self.vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in self.vocab)
        return {
            "tokenizer": Path(self.vocab_file).name,
            "vocab_file": self.vocab_file,
            "lowercase": self.lowercase,
            "UNK": self.token_id("[UNK]"),
            "CLS": self.token_id("[CLS]"),
            "SEP": self.token_id("[SEP]"),
            "MASK": self.token_id("[MASK]"),
            "v_range": [int(first), self.vocab_size],
            "vocab_size": self.vocab_size,
        }
