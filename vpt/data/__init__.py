"""Data: the embedded synthetic math set, record sources, tokenizer and grain pipeline."""

from vpt.data.feedback import (downstream_nll, encode_feedback_example, load_gsm8k_jsonl,
                               make_feedback_iterator, make_feedback_records)
from vpt.data.pipeline import encode_example, make_lm_dataset, make_lm_iterator
from vpt.data.sources import make_source, record_text
from vpt.data.synthetic_math import SyntheticMath, final_answer, format_prompt, write_gsm8k_jsonl
from vpt.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_or_train_tokenizer

__all__ = [
    "SentencePieceTokenizer", "SyntheticMath", "Tokenizer", "downstream_nll",
    "encode_example", "encode_feedback_example", "final_answer", "format_prompt",
    "load_gsm8k_jsonl", "load_or_train_tokenizer", "make_feedback_iterator",
    "make_feedback_records", "make_lm_dataset", "make_lm_iterator", "make_source", "record_text",
    "write_gsm8k_jsonl",
]
