"""Train the project's demo model: a small Mixtral-format MoE on the Python standard library's source.

    python scripts/train_demo_model.py                      # models/tiny-pymoe, sized to 22 minutes
    python scripts/train_demo_model.py --steps 1800 --out .scratch/pymoe

The text is the ``*.py`` source of the standard library of the interpreter running this script
(``sysconfig.get_paths()["stdlib"]``): on every machine, PSF-licensed. Files are read in sorted
order; tests, IDLE, site-packages and generated tables are skipped; a fixed share of the files
(chosen by a hash of their path) is held out and never trained on. A byte-level BPE tokenizer is
trained on the training files, then a Mixtral-format MoE (``MixtralForCausalLM``, per-expert
tensors as Hugging Face saves them, bf16) with AdamW and a cosine learning rate, on one thread.

Without ``--steps`` the step count is sized to ``--minutes`` (the whole run, start to files
written) from the measured speed of the first steps, and re-sized as training goes (another
process on the machine slows it); ``training.json`` records the steps taken, so ``--steps N``
repeats a run exactly (same Python version, same seed).

The folder gets config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, training.json, heldout-tokens.npy (int16 ids of held-out text, for routing
statistics) and a README.md model card. The card's vLLM sample and routing figures are measured
after training (the card names the commands); this script writes them as not yet measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

# One thread for torch (OpenMP) and for the tokenizers library (Rayon): set before either is imported.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED = 0
VOCAB_SIZE = 4096
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2
SEQ_LEN = 256
BATCH = 16  # 4,096 tokens a step: measured as fast per token as batch 8 here, with less noisy gradients
PEAK_LR = 3e-3  # small models (hidden 128) train well at a few 1e-3
MIN_LR_FRACTION = 0.1
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
#: first steps timed before the step count is chosen (all in warmup, whose LR does not depend on it)
TIMED_STEPS = 20
#: held out: files whose path hashes to 0 of this many buckets (about 5%)
HELDOUT_BUCKETS = 20
HELDOUT_NPY_TOKENS = 32_768
#: at most this many tokens from each held-out file in heldout-tokens.npy, so that it spans many files
#: (2,048 x the 32 held-out files of Python 3.11 give about 45k)
HELDOUT_NPY_TOKENS_PER_FILE = 2048
EVAL_WINDOWS = 128  # held-out loss over 128 x 256 tokens
#: seconds kept at the end of a time-sized run for the final evaluation and writing the files
RESERVE_S = 60
#: path parts never read: tests (incl. test data in old Python 2 syntax), IDLE, installed packages,
#: codec tables and pydoc's topic strings (generated data, not code)
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "encodings", "pydoc_data"}
#: pre-tokens: newline(s) with the next line's indentation, runs of spaces, words, punctuation runs.
#: A space is never glued to the next word, so a prompt ending in "def " or in an indentation
#: splits as the training text did.
PRETOKEN_PATTERN = r"\s*\n[ \t]*|[ \t]+|\w+|[^\w\s]+|\s+"
SHAPE = dict(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32,  # vLLM's CPU attention refuses head sizes under 32
    num_hidden_layers=6, num_local_experts=16, num_experts_per_tok=2, intermediate_size=64,
    max_position_embeddings=1024, tie_word_embeddings=False, router_aux_loss_coef=0.02,
)
PROMPTS = ['def read_config(path):\n    ', 'import os\n\n\ndef ', 'class Parser:\n    """']


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files under ``root``, sorted, without SKIP_PARTS."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts) or rel.name.startswith("_sysconfigdata"):
            continue  # _sysconfigdata: this machine's build settings, not code
        files.append(path)
    return files


def is_heldout(rel: str) -> bool:
    """Held out by a hash of the path, so the split does not move when files come and go."""
    return zlib.crc32(rel.encode()) % HELDOUT_BUCKETS == 0


def read_corpus(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(train texts, held-out texts, held-out paths)."""
    train, heldout, heldout_paths = [], [], []
    for path in stdlib_files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(root).as_posix()
        if is_heldout(rel):
            heldout.append(text)
            heldout_paths.append(rel)
        else:
            train.append(text)
    return train, heldout, heldout_paths


def train_tokenizer(texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # prompts start with <s>, as every training document does
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Documents as <s> text </s>, concatenated (int16: the vocabulary is 4,096)."""
    ids = [np.array(e.ids + [EOS_ID], dtype=np.int16) for e in tokenizer.encode_batch(texts)]
    return np.concatenate(ids)


def heldout_sample(tokenizer, texts: list[str]) -> np.ndarray:
    """HELDOUT_NPY_TOKENS ids of held-out text (no specials), up to 2,048 from each file in order."""
    parts, total = [], 0
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        part = enc.ids[:HELDOUT_NPY_TOKENS_PER_FILE]
        parts.append(part)
        total += len(part)
        if total >= HELDOUT_NPY_TOKENS:
            break
    ids = np.array([i for part in parts for i in part][:HELDOUT_NPY_TOKENS], dtype=np.int16)
    if len(ids) < HELDOUT_NPY_TOKENS:
        raise SystemExit(f"only {len(ids)} held-out tokens; need {HELDOUT_NPY_TOKENS}")
    return ids


def make_model():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, **SHAPE)
    torch.manual_seed(SEED)
    model = MixtralForCausalLM(config)
    # the grouped-matmul experts kernel: 10-15% faster per step than the eager loop here, 12x batched_mm
    model.config._experts_implementation = "grouped_mm"
    return model


def lr_at(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return PEAK_LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_loss(model, stream: np.ndarray, windows: int = EVAL_WINDOWS) -> float:
    """Mean next-token loss (nats, router loss excluded) over evenly spaced held-out windows."""
    import torch

    starts = np.linspace(0, len(stream) - SEQ_LEN - 1, windows).astype(np.int64)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for chunk in np.array_split(starts, max(1, windows // BATCH)):
            x = torch.from_numpy(np.stack([stream[s:s + SEQ_LEN + 1] for s in chunk]).astype(np.int64))
            logits = model(input_ids=x[:, :-1]).logits.float()  # [B, T, vocab]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1))
            total += loss.item() * len(chunk)
    model.train()
    return total / windows


def train(model, train_stream: np.ndarray, val_stream: np.ndarray, steps: int | None, deadline: float) -> dict:
    """AdamW with a cosine LR; ``steps`` None: sized to ``deadline`` from the measured step time."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(SEED)
    data = torch.from_numpy(train_stream.astype(np.int64))
    coef = model.config.router_aux_loss_coef
    total = steps if steps is not None else WARMUP_STEPS  # provisional until timed
    started, window_loss, window_n, window_start = time.time(), 0.0, 0, time.time()
    step = 0
    while step < total:
        lr = lr_at(step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=generator)
        x = torch.stack([data[s:s + SEQ_LEN + 1] for s in starts.tolist()])  # [B, T+1]
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1))
        (lm_loss + coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += lm_loss.item()
        window_n += 1
        step += 1
        elapsed = time.time() - started
        if steps is None and (step == TIMED_STEPS or (step > TIMED_STEPS and step % 100 == 0)):
            # re-size to the time left at the speed so far (another process may share the cores)
            total = max(step + 1, step + int((deadline - RESERVE_S - time.time()) / (elapsed / step)))
        if step % 50 == 0 or step == total:
            now = time.time()
            tok_s = window_n * BATCH * SEQ_LEN / (now - window_start)
            eta = (total - step) * elapsed / step
            print(f"step {step}/{total}  loss {window_loss / window_n:.3f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  "
                  f"elapsed {elapsed / 60:.1f} min  ETA {eta / 60:.1f} min", flush=True)
            window_loss, window_n, window_start = 0.0, 0, now
        if step % 500 == 0 and step < total:
            print(f"  held-out loss (16 windows) {heldout_loss(model, val_stream, 16):.3f}", flush=True)
    return {"steps": step, "tokens_seen": step * BATCH * SEQ_LEN, "train_s": round(time.time() - started, 1)}


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"params": total, "expert_params": experts}


def save(model, tokenizer, out: Path) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast

    model.config.output_router_logits = False  # serving needs no router loss
    model.to(torch.bfloat16).save_pretrained(out)
    # transformers' default generation config says nothing config.json does not (bos, eos): left out
    (Path(out) / "generation_config.json").unlink(missing_ok=True)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", model_max_length=SHAPE["max_position_embeddings"])
    hf_tokenizer.save_pretrained(out)
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (out / extra).unlink(missing_ok=True)  # the two files above are all vLLM needs


def model_card(info: dict) -> str:
    mb = info["safetensors_bytes"] / 1e6
    share = info["expert_params"] / info["params"]
    ppl = math.exp(info["heldout_loss"])
    py = info["python"]
    return f"""# tiny-pymoe

A small Mixtral-format Mixture-of-Experts language model **trained** on the source code of Python's standard
library, shipped with vllm-moe-offload so that the demo (`examples/offline_generate.py`) prints readable
Python-looking text and so that tests and benchmarks have learned (not random) routing. It is a toy: it
continues code with plausible identifiers, keywords and indentation, not correct programs.

Hugging Face layout as real Mixtral checkpoints store it (`MixtralForCausalLM`, per-expert tensors
`model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`, router `...block_sparse_moe.gate.weight`), bf16,
with its own byte-level BPE tokenizer (`tokenizer.json`). Made by `python scripts/train_demo_model.py`
(seed {SEED}); `training.json` holds the run's figures.

| | |
| --- | --- |
| shape | {SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, {SHAPE['num_attention_heads']} heads \
({SHAPE['num_key_value_heads']} KV heads, head size {SHAPE['head_dim']}), {SHAPE['num_local_experts']} experts \
per layer, top-{SHAPE['num_experts_per_tok']}, expert FFN {SHAPE['intermediate_size']}, untied embeddings, \
context {SHAPE['max_position_embeddings']} |
| size | {info['params'] / 1e6:.2f} M parameters, {mb:.1f} MB (bf16 safetensors); experts are \
{info['expert_params'] / 1e6:.2f} M of them ({share:.0%}); one expert {info['expert_bytes']:,} bytes |
| tokenizer | byte-level BPE, {VOCAB_SIZE:,} entries (`<unk>`=0, `<s>`=1, `</s>`=2); a space is its own \
pre-token, never glued to the next word; a prompt starts with `<s>` |
| training | {info['steps']:,} steps of {BATCH} x {SEQ_LEN} tokens ({info['tokens_seen'] / 1e6:.1f} M tokens seen, \
{info['tokens_seen'] / info['train_tokens']:.1f} epochs of {info['train_tokens'] / 1e6:.2f} M training tokens), \
AdamW (peak LR {PEAK_LR}, cosine to {MIN_LR_FRACTION:.0%}, weight decay {WEIGHT_DECAY}), router \
load-balancing loss {SHAPE['router_aux_loss_coef']}; {info['wall_s'] / 60:.1f} minutes on one CPU thread |
| held-out loss | {info['heldout_loss']:.3f} nats per token (perplexity {ppl:.1f}) on {EVAL_WINDOWS} x {SEQ_LEN} \
tokens of the {info['heldout_files']} held-out files ({info['val_tokens']:,} tokens) |

## Data

The `*.py` files of the standard library of CPython {py} (`sysconfig.get_paths()["stdlib"]`), read in sorted
order, without `test`/`tests` folders, `idlelib`, `site-packages`, `encodings` (codec tables), `pydoc_data`
and `_sysconfigdata*`: {info['train_files']} training files ({info['train_tokens']:,} tokens) and
{info['heldout_files']} held-out files (paths whose CRC-32 is 0 modulo {HELDOUT_BUCKETS}), never trained on.
Each file is one document, `<s>` text `</s>`.

`heldout-tokens.npy`: {HELDOUT_NPY_TOKENS:,} token ids (int16) of held-out text, without special tokens, up to
{HELDOUT_NPY_TOKENS_PER_FILE:,} from each held-out file in path order: for routing statistics and
perplexity in tests.

## Licence

The weights and tokenizer are released under the Apache License 2.0, as the project. The training data is
Python's standard library source, under the Python Software Foundation License Version 2
(https://docs.python.org/3/license.html); the held-out token file is derived from it under that licence.

## Greedy sample from stock vLLM

Not measured for this run yet: generate greedily with stock vLLM (`VLLM_PLUGINS=none`) from the prompts of
`examples/offline_generate.py`, and with the plugin (`policy lru`, `budget 25%`): the tokens must be the same.

## Routing

Its routing is learned, so cache hit rates and prediction figures measured on it mean something, but it is
a toy: a small model on one kind of text. Not measured for this run yet:

```bash
vllm-moe-offload trace models/tiny-pymoe --prompts models/tiny-pymoe/heldout-tokens.npy \\
    --num-prompts 32 --prompt-len 128 --max-tokens 32 --out .scratch/pymoe-trace.npz
vllm-moe-offload simulate .scratch/pymoe-trace.npz --budgets 25%,50% --policies lru
```
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "models" / "tiny-pymoe",
                        help="output folder (default: models/tiny-pymoe in the repository)")
    parser.add_argument("--minutes", type=float, default=22.0,
                        help="wall-clock budget of the whole run when --steps is not given (default 22)")
    parser.add_argument("--steps", type=int, help="train exactly this many steps (default: as --minutes allows)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    deadline = started + args.minutes * 60
    import torch

    torch.set_num_threads(1)
    root = Path(sysconfig.get_paths()["stdlib"])
    train_texts, heldout_texts, heldout_paths = read_corpus(root)
    print(f"Python {platform.python_version()} stdlib at {root}: {len(train_texts)} training files, "
          f"{len(heldout_texts)} held out ({sum(map(len, train_texts)) / 1e6:.1f} MB of training text)", flush=True)
    tokenizer = train_tokenizer(train_texts)
    train_stream = encode_stream(tokenizer, train_texts)
    val_stream = encode_stream(tokenizer, heldout_texts)
    print(f"tokenizer trained, {len(train_stream):,} training tokens, {len(val_stream):,} held-out tokens "
          f"({time.time() - started:.0f} s)", flush=True)

    model = make_model()
    info = param_counts(model)
    print(f"{info['params']:,} parameters, experts {info['expert_params']:,}", flush=True)
    info.update(train(model, train_stream, val_stream, args.steps, deadline))
    info["heldout_loss"] = round(heldout_loss(model.to(torch.bfloat16).float(), val_stream), 4)  # the bf16 weights
    print(f"held-out loss {info['heldout_loss']:.3f} (perplexity {math.exp(info['heldout_loss']):.1f})", flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save(model, tokenizer, out)
    np.save(out / "heldout-tokens.npy", heldout_sample(tokenizer, heldout_texts))
    expert = SHAPE["intermediate_size"] * SHAPE["hidden_size"] * 3 * 2  # w1, w2, w3 in bf16
    info.update(
        seed=SEED, batch=BATCH, seq_len=SEQ_LEN, train_tokens=int(len(train_stream)), val_tokens=int(len(val_stream)),
        train_files=len(train_texts), heldout_files=len(heldout_texts), heldout_paths=heldout_paths,
        python=platform.python_version(), torch=torch.__version__, expert_bytes=expert,
        safetensors_bytes=(out / "model.safetensors").stat().st_size, wall_s=round(time.time() - started, 1),
    )
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "README.md").write_text(model_card(info))
    print(f"wrote {out} in {info['wall_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    sys.exit(main())
