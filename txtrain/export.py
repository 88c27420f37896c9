"""``txtrain-export``: a checkpoint as files other tools load, without pickles.

    txtrain-export <run dir | checkpoint> --out gpt2-socrates          (Hugging Face transformers)
    txtrain-export <run dir> --out weights --format safetensors      (txtrain's own state dict)

``--format hf`` (the default) writes a folder that ``transformers.GPT2LMHeadModel
.from_pretrained`` loads: ``config.json``, ``generation_config.json``, the weights as
``model.safetensors`` (shards and ``model.safetensors.index.json`` past ``--max-shard-size``)
and, when the model was trained on GPT-2's tokenizer, its files (``vocab.json`` and
``merges.txt``, derived from the tiktoken ranks). It takes a GPT whose architecture is GPT-2's:
learned positions, pre-norm, GELU, biases (tied or untied head, any width, depth, heads or
feed-forward width). GPT-2's GELU is the tanh approximation (``gelu_new``); txtrain's is
exact, which GPT-2's config names ``gelu``. The padded vocabulary rows are cut off.

``--format safetensors`` writes ``model.safetensors``: txtrain's own state dict, any
architecture, the tied head once (under ``token_embedding.weight``), with the model config,
vocabulary size, step and tokenizer as the file's metadata (``txtrain.*`` keys).

The checkpoint may come from any layout (fsdp, a pipeline, ...): it is read into one process,
with no process group.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from txtrain.config import ConfigError, ModelConfig, TrainingStopped

FORMATS = ("hf", "safetensors")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
END_OF_TEXT = "<|endoftext|>"


def parse_size(text: str) -> int:
    """``2GB`` (10^9 bytes, as transformers counts), ``500MiB``, ``1000`` (bytes)."""
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GB, 500MB, 10MiB, 4096)")
    size = int(float(match.group(1)) * UNITS[(match.group(2) or "b").lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError("the shard size must be positive")
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="txtrain-export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run dir, a checkpoints folder or a checkpoint folder")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: a transformers GPT-2 folder; safetensors: txtrain's own state dict")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                        help="hf: split the weights into files of at most this size (default 2GB)")
    parser.add_argument("--best", action="store_true", help="the best checkpoint (train.patience), not the latest")
    parser.add_argument("--tokenizer-file", default=None,
                        help="where the GPT-2 ranks are now, if not where training read them")
    parser.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    return parser.parse_args(argv)


# --- what maps onto GPT-2 ---------------------------------------------------------------------
def word(value) -> str:
    return str(getattr(value, "value", value))


def gpt2_mismatches(cfg: ModelConfig) -> list[str]:
    """What of ``cfg`` GPT-2's architecture cannot express (empty: it maps)."""
    wrong = []
    if word(cfg.arch) != "gpt":
        wrong.append(f"model.arch={word(cfg.arch)} (GPT-2 is a decoder-only GPT)")
    if word(cfg.pos) != "learned":
        wrong.append(f"model.pos={word(cfg.pos)} (GPT-2 learns its positions)")
    if word(cfg.norm) != "pre":
        wrong.append(f"model.norm={word(cfg.norm)} (GPT-2 normalizes before each sublayer)")
    if word(cfg.activation) != "gelu":
        wrong.append(f"model.activation={word(cfg.activation)} (GPT-2's is GELU)")
    if not cfg.bias:
        wrong.append("model.bias=false (GPT-2's linear layers and norms have biases)")
    return wrong


def gpt2_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names. GPT-2's Conv1D keeps its weight as
    (in, out), the transpose of nn.Linear's; its c_attn is txtrain's query and key_value
    (keys, then values) side by side; the padded vocabulary rows are cut off."""
    vocab = model.vocab_size

    def linear(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().t().contiguous()

    state = {"transformer.wte.weight": model.token_embedding.weight.detach()[:vocab].contiguous(),
             "transformer.wpe.weight": model.positions.table.weight.detach().contiguous()}
    for name, block in model.blocks.items():
        h, attn, ffn = f"transformer.h.{name}", block.attn, block.ffn
        state.update({
            f"{h}.ln_1.weight": block.attn_norm.weight.detach(), f"{h}.ln_1.bias": block.attn_norm.bias.detach(),
            f"{h}.attn.c_attn.weight": linear(torch.cat([attn.query.weight, attn.key_value.weight])),
            f"{h}.attn.c_attn.bias": torch.cat([attn.query.bias, attn.key_value.bias]).detach(),
            f"{h}.attn.c_proj.weight": linear(attn.out.weight), f"{h}.attn.c_proj.bias": attn.out.bias.detach(),
            f"{h}.ln_2.weight": block.ffn_norm.weight.detach(), f"{h}.ln_2.bias": block.ffn_norm.bias.detach(),
            f"{h}.mlp.c_fc.weight": linear(ffn.up.weight), f"{h}.mlp.c_fc.bias": ffn.up.bias.detach(),
            f"{h}.mlp.c_proj.weight": linear(ffn.down.weight), f"{h}.mlp.c_proj.bias": ffn.down.bias.detach(),
        })
    state["transformer.ln_f.weight"] = model.final_norm.weight.detach()
    state["transformer.ln_f.bias"] = model.final_norm.bias.detach()
    if not model.cfg.tie_embeddings:
        state["lm_head.weight"] = model.head.weight.detach()[:vocab].contiguous()
    return state


def gpt2_config(model, end_of_text: int | None) -> dict:
    """config.json, read off the model's own modules where GPT-2 has a choice."""
    cfg, act = model.cfg, next(iter(model.blocks.values())).ffn.act
    # nn.GELU() is the exact (erf) GELU: transformers' "gelu". GPT-2's own is the tanh
    # approximation, "gelu_new" (nn.GELU(approximate="tanh")).
    gelu = "gelu_new" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model.vocab_size, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ffn_width,
        "activation_function": gelu,
        "layer_norm_epsilon": model.final_norm.eps,  # nn.LayerNorm's 1e-5, as GPT-2's
        "scale_attn_weights": True,  # 1/sqrt(head dim)
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "tie_word_embeddings": bool(cfg.tie_embeddings),
        "bos_token_id": end_of_text, "eos_token_id": end_of_text, "use_cache": True,
        "torch_dtype": str(model.token_embedding.weight.dtype).removeprefix("torch."),
    }


# --- GPT-2's tokenizer files from tiktoken's ranks ------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (its vocab.json spells tokens with them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def merge_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """Byte-pair encode ``token`` with the merges ranked below ``below``: for a token of rank
    ``below``, the two parts whose merge made it."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < below and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i: i + 2] = [parts[i] + parts[i + 1]]


def gpt2_tokenizer_files(ranks: dict[bytes, int], special: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """vocab.json's entries and merges.txt's lines for tiktoken's ``ranks``."""
    spell = bytes_to_unicode()
    text = lambda token: "".join(spell[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = merge_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ConfigError(f"the tokenizer's ranks are not GPT-2's byte-pair merges (token {rank} "
                              "is not one merge of two earlier ones)")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab.update(special)
    return vocab, merges


def write_tokenizer(folder: Path, codec, context: int) -> bool:
    """GPT-2's tokenizer files for a codec that is GPT-2's tiktoken encoding; False for any
    other tokenizer (there is nothing transformers would read)."""
    from txtrain.tasks.tokenizers import GPT2_NAMES

    encoding = getattr(codec, "encoding", None)
    if getattr(codec, "name", None) not in GPT2_NAMES or encoding is None:
        return False
    special = dict(getattr(encoding, "_special_tokens", {END_OF_TEXT: codec.end_of_text}))
    vocab, merges = gpt2_tokenizer_files(encoding._mergeable_ranks, special)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokens = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    write_json(folder / "special_tokens_map.json", tokens)
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", **tokens,
                                                   "add_prefix_space": False, "add_bos_token": False,
                                                   "model_max_length": context})
    return True


# --- writing -------------------------------------------------------------------------------------
def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into groups of at most ``max_bytes`` (a larger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def save_sharded(folder: Path, state: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` and the index
    transformers reads them by. Returns the files written."""
    from safetensors.torch import save_file

    groups = shards(state, max_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    weight_map, names = {}, []
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, INDEX]


def check_maps_to_gpt2(cfg: ModelConfig) -> None:
    wrong = gpt2_mismatches(cfg)
    if wrong:
        raise ConfigError("this model does not map onto GPT-2 (transformers' GPT2LMHeadModel): "
                          + "; ".join(wrong) + "; --format safetensors exports txtrain's own weights")


def export_hf(model, meta, codec, folder: Path, max_bytes: int) -> list[str]:
    cfg = model.cfg
    check_maps_to_gpt2(cfg)
    state = gpt2_state_dict(model)
    gpt2_tokenizer = write_tokenizer(folder, codec, cfg.max_seq_len)
    end = codec.end_of_text if gpt2_tokenizer else None
    write_json(folder / "config.json", gpt2_config(model, end))
    generation = {"_from_model_config": True}
    if end is not None:
        generation.update(bos_token_id=end, eos_token_id=end)
    write_json(folder / "generation_config.json", generation)
    written = save_sharded(folder, state, max_bytes)
    if not gpt2_tokenizer:
        print(f"# no tokenizer files: the model's tokenizer ({describe_codec(meta.codec)}) is not "
              "GPT-2's, and transformers has no equivalent", file=sys.stderr)
    return written


def describe_codec(state: dict) -> str:
    kind = state.get("kind")
    if kind == "tiktoken":
        return state.get("name", kind)
    if kind == "synthetic":
        return f"the {state['config']['name']} task's symbols"
    return str(kind)


def export_safetensors(model, meta, folder: Path) -> list[str]:
    """txtrain's own state dict, a tied matrix once, the config as metadata."""
    from safetensors.torch import save_file

    from txtrain.model.base import tied_aliases

    aliases = tied_aliases(model)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
             if name not in aliases}
    save_file(state, str(folder / WEIGHTS), metadata={
        "format": "pt",
        "txtrain.model_config": json.dumps(meta.model_config),
        "txtrain.vocab_size": str(meta.vocab_size),
        "txtrain.step": str(meta.step),
        "txtrain.tied": json.dumps(aliases),
        "txtrain.codec": json.dumps(meta.codec),
    })
    return [WEIGHTS]


def prepare_out(out: Path, force: bool) -> Path:
    """A hidden folder beside ``out`` to write into (renamed to ``out`` when whole)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty; give a new or empty folder (or --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    return partial


def publish(partial: Path, out: Path) -> None:
    """``partial`` renamed to ``out``, its files readable as the umask allows (safetensors
    writes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in partial.iterdir():
        path.chmod(0o666 & ~umask)
    if out.is_dir():
        shutil.rmtree(out)
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from txtrain.checkpoint import best_checkpoint
    from txtrain.collective import describe_failure
    from txtrain.sample import load_model
    from txtrain.tasks import codec_from_checkpoint

    out = Path(args.out).expanduser()
    try:
        import safetensors  # noqa: F401
    except ImportError:
        print("error: txtrain-export writes safetensors files: pip install 'txtrain[export]' "
              "(or pip install safetensors)", file=sys.stderr)
        sys.exit(2)
    partial = None
    try:
        source = best_checkpoint(Path(args.checkpoint)) if args.best else Path(args.checkpoint)
        model, meta, checkpoint = load_model(source, torch.device("cpu"))
        if args.format == "hf":
            check_maps_to_gpt2(model.cfg)  # before the tokenizer and before writing anything
            codec = codec_from_checkpoint(meta.as_dict(), args.tokenizer_file)
        partial = prepare_out(out, args.force)
        if args.format == "hf":
            export_hf(model, meta, codec, partial, args.max_shard_size)
        else:
            export_safetensors(model, meta, partial)
        publish(partial, out)
    except (ConfigError, ValueError, TrainingStopped, OSError) as error:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        print(f"error: {describe_failure(error) if isinstance(error, OSError) else error}",
              file=sys.stderr)
        sys.exit(2)
    names = sorted(os.listdir(out))
    parts = [name for name in names if name.startswith("model-")]
    listed = [name for name in names if name not in parts] + ([f"{len(parts)} shards"] if parts else [])
    print(f"# {checkpoint} (step {meta.step}) -> {out}: {', '.join(listed)}", file=sys.stderr)


if __name__ == "__main__":
    main()
