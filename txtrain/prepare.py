"""``txtrain-prepare``: tokenize text once into shards that training reads without loading.

    txtrain-prepare corpus/ --out data/corpus-gpt2 --tokenizer gpt2 --workers 8
    txtrain-prepare web/*.jsonl.gz --out data/web --text-field text --shard-tokens 100000000
    txtrain task=text task.data.path=data/corpus-gpt2

Inputs are .txt files (a document each), .jsonl/.jsonl.gz (a document per line), .parquet
(a document per row; pip install 'txtrain[parquet]'), folders of them, or hf:NAME[:CONFIG]
(a Hugging Face dataset; pip install 'txtrain[hf]'). The output is a folder of llm.c-format
shards and dataset.json; run the same command again to finish an interrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from txtrain.config import ConfigError
from txtrain.tasks.documents import documents, find_sources
from txtrain.tasks.prepared import DEFAULT_SHARD_TOKENS, prepare_dataset
from txtrain.tasks.tokenizers import SIMPLE, build_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="txtrain-prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or hf:NAME[:CONFIG]")
    parser.add_argument("--out", required=True, type=Path, help="the dataset's folder (new or empty)")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 or another tiktoken encoding | bytes | char")
    parser.add_argument("--tokenizer-file", default=None, help="local .tiktoken ranks (offline machines)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizing processes (default: one per core)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="the end of the token stream held out for validation (0: none)")
    parser.add_argument("--text-field", default="text", help="the text's field (.jsonl) or column (.parquet)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.shard_tokens < 1 or not 0 <= args.val_fraction < 1:
        parser.error("--workers and --shard-tokens must be positive, --val-fraction in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        sources = find_sources(args.inputs)
        if args.tokenizer in SIMPLE and args.tokenizer_file:
            raise ConfigError(f"--tokenizer-file works with --tokenizer gpt2, not {args.tokenizer}")
        corpus_text = None
        if args.tokenizer == "char":  # its vocabulary is the input's characters: one pass to find them
            corpus_text = "".join(sorted({ch for source in sources
                                          for text, _ in documents(source, args.text_field) for ch in text}))
            corpus_text += "\n\n"
        tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_file, corpus_text)
        description = prepare_dataset(sources, args.out, tokenizer, workers=args.workers,
                                      shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                                      text_field=args.text_field, progress=args.progress)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a full disk, a folder it may not write
        print(f"error: {error.strerror or error} ({error.filename or args.out}); the shards finished so "
              "far are kept: make room and run the same command again", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stopped: run the same command again to go on from the last finished shard",
              file=sys.stderr)
        sys.exit(130)
    tokens, shards = description["tokens"], description["shards"]
    print(f"{args.out}: {tokens['train']:,} training tokens in {len(shards['train'])} shard(s), "
          f"{tokens['val']:,} validation tokens in {len(shards['val'])}, tokenizer {tokenizer.name}")
    print(f"train on it: txtrain task=text task.data.path={args.out} task.tokenizer={tokenizer.name}")


if __name__ == "__main__":
    main()
