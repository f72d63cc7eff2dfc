"""``vllm-moe-offload pad-model``: a benchmark copy of a Mixtral-format MoE with fatter experts.

A tiny model's experts weigh kilobytes and load in microseconds, so offload
costs vanish; a real model's weigh hundreds of megabytes. To measure in the
right regime (DESIGN.md section 5) this writes a copy whose experts are padded
along the intermediate dimension by ``--factor N``:

* ``w1`` and ``w3`` (``[I, H]``) get ``(N - 1) * I`` extra rows, random with the
  standard deviation of the tensor's existing rows (so the kernels see ordinary
  values, never zeros they could skip);
* ``w2`` (``[H, I]``) gets the matching ``(N - 1) * I`` columns, all zero.

Expert e computes ``w2 @ (silu(w1 x) * w3 x)``; the extra intermediate units
are finite and are multiplied by zero columns, so the model's function is
unchanged (up to the summation order of the longer dot products). Every other
tensor is copied as is, ``intermediate_size`` in ``config.json`` is updated,
the tokenizer and other small files are copied, and ``pad_model.json`` records
the source and factor.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

from vllm_moe_offload.cli.main import Subcommand

logger = logging.getLogger("vllm.moe_offload.pad_model")

#: Mixtral's per-expert tensor names: ``...experts.<e>.w1.weight``
EXPERT_RE = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3)\.weight$")

#: files that describe the weights and are rewritten rather than copied
_REWRITTEN = {"config.json", "model.safetensors.index.json", "pad_model.json"}

#: keeps one shard (and the memory holding it before it is written) bounded
DEFAULT_SHARD_BYTES = 2 * 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="folder of a Mixtral-format checkpoint (safetensors + config.json)")
    parser.add_argument("dst", type=Path, help="folder to write (created; must be empty or absent)")
    parser.add_argument(
        "--factor", type=int, required=True,
        help="new intermediate size = factor x old (each expert weighs factor times more)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rows (default %(default)s)")
    add_writer_arguments(parser)


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shard-bytes`` and ``--no-progress``: how a command that writes a checkpoint writes it."""
    parser.add_argument(
        "--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
        help="largest safetensors shard written, in bytes (default 2 GiB)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        report = pad_model(args.src, args.dst, args.factor, seed=args.seed, shard_bytes=args.shard_bytes,
                           progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"vllm-moe-offload pad-model: error: {exc}")
        return 2
    print(
        f"wrote {args.dst}: intermediate_size {report['intermediate_size_before']} -> "
        f"{report['intermediate_size_after']}, {report['num_expert_tensors']} expert tensors padded, "
        f"one expert {report['expert_bytes_after'] / 2**20:.2f} MiB, all experts "
        f"{report['all_expert_bytes_after'] / 2**20:.1f} MiB, {len(report['shards'])} shard(s)"
    )
    return 0


def pad_model(
    src: str | Path, dst: str | Path, factor: int, *, seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
) -> dict:
    """Write the padded copy of ``src`` to ``dst``; returns what ``pad_model.json`` records."""
    import torch
    from safetensors import safe_open
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if factor < 1:
        raise ValueError(f"--factor must be a positive integer, got {factor}")
    config = json.loads((src / "config.json").read_text())
    inter = config.get("intermediate_size")
    if not isinstance(inter, int) or "num_local_experts" not in config:
        raise ValueError(
            f"{src} is not a Mixtral-format MoE (config.json needs intermediate_size and num_local_experts)"
        )
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(dst, shard_bytes)
    num_padded = 0
    dtype_bytes = None
    handles = [safe_open(str(path), framework="pt") for path in files]
    names = [(h, name) for h in handles for name in sorted(h.keys())]
    for handle, name in tqdm(names, desc="padding experts", unit="tensor", disable=not progress or None):
        tensor = handle.get_tensor(name)
        match = EXPERT_RE.search(name)
        if match:
            tensor = pad_expert_tensor(tensor, match.group(2), inter, factor, generator)
            num_padded += 1
            dtype_bytes = tensor.element_size()
        writer.add(name, tensor)
    shards = writer.close()
    if not num_padded:
        raise ValueError(f"no Mixtral expert tensors (...experts.E.w1/w2/w3.weight) in {src}")

    config["intermediate_size"] = inter * factor
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copied = _copy_small_files(src, dst)
    hidden = int(config["hidden_size"])
    num_experts = int(config["num_local_experts"])
    report = {
        "source": str(src.resolve()),
        "factor": factor,
        "seed": seed,
        "intermediate_size_before": inter,
        "intermediate_size_after": inter * factor,
        "num_expert_tensors": num_padded,
        "expert_bytes_before": 3 * hidden * inter * (dtype_bytes or 2),
        "expert_bytes_after": 3 * hidden * inter * factor * (dtype_bytes or 2),
        "all_expert_bytes_after": num_padded // 3 * 3 * hidden * inter * factor * (dtype_bytes or 2),
        "num_experts_per_layer": num_experts,
        "shards": [p.name for p in shards],
        "copied": copied,
        "how": "w1/w3 extra rows random (std of the existing rows), w2 extra columns zero: function unchanged",
    }
    (dst / "pad_model.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def pad_expert_tensor(tensor, proj: str, inter: int, factor: int, generator):
    """One expert projection padded along its intermediate dimension (see module docstring)."""
    import torch

    extra = inter * (factor - 1)
    if proj in ("w1", "w3"):  # [I, H]
        if tensor.shape[0] != inter:
            raise ValueError(f"{proj} has {tensor.shape[0]} rows, config says intermediate_size {inter}")
        std = float(tensor.float().std()) or 1.0
        rows = torch.randn((extra, tensor.shape[1]), generator=generator) * std  # [extra, H]
        return torch.cat([tensor, rows.to(tensor.dtype)], dim=0)  # [N*I, H]
    if tensor.shape[1] != inter:  # w2: [H, I]
        raise ValueError(f"w2 has {tensor.shape[1]} columns, config says intermediate_size {inter}")
    zeros = torch.zeros((tensor.shape[0], extra), dtype=tensor.dtype)
    return torch.cat([tensor, zeros], dim=1)  # [H, N*I]


class _ShardWriter:
    """Writes tensors into shards of at most ``shard_bytes`` (one tensor may exceed it alone)."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self._tensors: dict = {}
        self._bytes = 0
        self._written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._tensors and self._bytes + size > self.shard_bytes:
            self._flush()
        self._tensors[name] = tensor.contiguous()
        self._bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self._written):05d}.safetensors.tmp"
        save_file(self._tensors, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._tensors)))
        self._tensors, self._bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard and give shards their final names (plus an index when several)."""
        if self._tensors:
            self._flush()
        count = len(self._written)
        final = []
        weight_map = {}
        for i, (tmp, names) in enumerate(self._written):
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path = self.folder / name
            tmp.rename(path)
            path.chmod(0o644)
            final.append(path)
            weight_map.update({tensor: name for tensor in names})
        if count > 1:
            index = {"metadata": {}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def _copy_small_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, generation config and other non-weight files."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in _REWRITTEN:
            shutil.copyfile(path, dst / path.name)
            copied.append(path.name)
    return copied


COMMAND = Subcommand(
    name="pad-model",
    help="copy a Mixtral-format MoE with experts padded along the intermediate dimension (same function)",
    add_arguments=add_arguments,
    run=run,
)


if __name__ == "__main__":
    import sys

    from vllm_moe_offload.cli.main import main

    sys.exit(main(["pad-model", *sys.argv[1:]]))
