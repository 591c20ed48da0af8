"""``pmp-preprocess``: tokenize documents into a Megatron indexed dataset (PREFIX.bin / PREFIX.idx),
optionally training the SentencePiece tokenizer on the same inputs first. Hugging Face (``tokenizer.json``)
and tiktoken tokenizers are read through ``megatron.core.tokenizers`` (``--tokenizer-type``).

    pmp-preprocess --input builtin:prose --output-prefix data/prose \\
        --tokenizer-model data/tok.model --train-tokenizer --vocab-size 4096 --workers 2

Inputs: ``builtin:<domain>`` (see pmp_megatron.data.corpora), JSONL files (.jsonl/.json; the text under
--json-key) or plain text files (one document per file; per blank-line-separated paragraph with
--split-paragraphs). All inputs go into one output dataset; run once per dataset to blend several.

Nothing is replaced unless the whole run succeeds: a tokenizer trained with --train-tokenizer is written
together with the dataset, and a failure leaves the files already at --output-prefix and
--tokenizer-model as they were.
"""

from __future__ import annotations

import argparse
import os
import sys

from pmp_megatron.cli.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The pmp-preprocess argument parser."""
    parser = argparse.ArgumentParser(prog="pmp-preprocess", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, metavar="FILE_OR_builtin:DOMAIN",
                        help="a document source; repeat for several (they are concatenated in order)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    parser.add_argument("--tokenizer-model", required=True,
                        help="the tokenizer: a SentencePiece .model (to use, or to write with "
                             "--train-tokenizer), a Hugging Face tokenizer directory or its tokenizer.json, "
                             "or megatron's tiktoken vocabulary .json")
    parser.add_argument("--tokenizer-type", choices=("sentencepiece", "huggingface", "tiktoken"),
                        default="sentencepiece", help="how to read --tokenizer-model (data.tokenizer_type)")
    parser.add_argument("--tiktoken-pattern", choices=("v1", "v2"), default="v2",
                        help="tiktoken: megatron's text-splitting regex (data.tiktoken_pattern)")
    parser.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                        help="tiktoken: control ids before the vocabulary (data.tiktoken_num_special_tokens)")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train the tokenizer on the inputs first and write it to --tokenizer-model")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size for --train-tokenizer")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                        help="SentencePiece model type for --train-tokenizer")
    parser.add_argument("--tokenizer-max-sentences", type=int, default=2_000_000,
                        help="lines (the first ones) used to train the tokenizer")
    parser.add_argument("--json-key", default="text", help="the text field of JSONL inputs")
    parser.add_argument("--split-paragraphs", action="store_true",
                        help="plain text inputs: one document per blank-line-separated paragraph")
    parser.add_argument("--max-docs", type=int, help="documents taken from each input at most")
    parser.add_argument("--max-chars", type=int, help="characters kept from each document at most")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="tokenizer processes (the output does not depend on it)")
    parser.add_argument("--chunk-size", type=int, default=16, help="documents per task sent to a worker")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: list[str]) -> int:
    """Train the tokenizer (optionally), write the indexed dataset, print one summary line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        parser.error("--train-tokenizer needs --vocab-size")
    if args.train_tokenizer and args.tokenizer_type != "sentencepiece":
        parser.error("--train-tokenizer trains a SentencePiece model: "
                     "it needs --tokenizer-type sentencepiece")
    setup_logging()
    from pmp_megatron.data.indexed import iter_inputs, preprocess
    from pmp_megatron.data.library_tokenizer import load_tokenizer
    from pmp_megatron.data.tokenizer import Tokenizer, train_tokenizer_proto

    limits = dict(json_key=args.json_key, split_paragraphs=args.split_paragraphs,
                  max_docs=args.max_docs, max_chars=args.max_chars)
    if args.train_tokenizer:
        proto = train_tokenizer_proto(iter_inputs(args.input, **limits), args.vocab_size,
                                      model_type=args.model_type, max_sentences=args.tokenizer_max_sentences)
        tokenizer = Tokenizer.from_proto(proto, args.tokenizer_model)
    else:
        tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model, args.tiktoken_pattern,
                                   args.tiktoken_num_special_tokens)
    meta = preprocess(args.input, args.output_prefix, tokenizer, workers=args.workers,
                      chunk_size=args.chunk_size, progress=not args.no_progress,
                      write_tokenizer=args.train_tokenizer, **limits)
    sys.stdout.write(f"{args.output_prefix}: {meta['num_documents']} documents, {meta['num_tokens']} tokens "
                     f"({meta['dtype']}), vocab {meta['vocab_size']}\n")
    return 0
