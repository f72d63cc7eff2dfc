"""The measuring subcommands: cheap to list, and bad arguments refused before any engine starts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, TINY_PYMOE
from vllm_moe_offload.cli.main import main
from vllm_moe_offload.cli.trace import load_prompts


def test_parser_with_every_subcommand_imports_no_torch_vllm_or_matplotlib():
    code = (
        "import json, sys\n"
        "from vllm_moe_offload.cli.main import build_parser, subcommands\n"
        "names = [c.name for c in subcommands()]\n"
        "build_parser(subcommands())\n"
        "print(json.dumps([names, [m for m in ('torch', 'vllm', 'matplotlib') if m in sys.modules]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    names, heavy = json.loads(out.stdout)
    assert {"pad-model", "trace", "bench"} <= set(names)
    assert heavy == []


def test_bench_refuses_bad_settings(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", str(TINY_PYMOE), "--policies", "off", "--out", str(out)]) == 2
    assert main(["bench", str(TINY_PYMOE), "--budgets", "0%", "--out", str(out)]) == 2
    assert main(["bench", str(TINY_PYMOE), "--policies", "nope", "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert "does not offload" in printed and "must be in (0%, 100%]" in printed and "'nope'" in printed
    assert not out.exists()


def test_pad_model_refuses_bad_factor(tmp_path, capsys):
    assert main(["pad-model", str(TINY_PYMOE), str(tmp_path / "x"), "--factor", "0", "--no-progress"]) == 2
    assert "--factor must be a positive integer" in capsys.readouterr().out


def test_trace_prompts_from_text_and_npy(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\nsecond\n")
    prompts, labels = load_prompts(text, None, 0)
    assert prompts == ["first prompt", "second"] and labels == prompts
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(100, dtype=np.int16))
    prompts, labels = load_prompts(ids, 3, 10)
    assert [p["prompt_token_ids"] for p in prompts] == [list(range(i * 10, i * 10 + 10)) for i in range(3)]
    assert labels[1] == "ids.npy[10:20]"
    try:
        load_prompts(ids, 20, 10)
    except ValueError as exc:
        assert "fewer than 20 prompts x 10" in str(exc)
    else:
        raise AssertionError("too few tokens were accepted")


def test_bench_policy_entries_carry_settings_for_ablations(tmp_path, capsys):
    from vllm_moe_offload.cli.bench import policy_settings, split_policies

    entries = split_policies("lru, klotski[klotski_features=hot+reorder;klotski_max_group=2],klotski[klotski_features=none]")
    assert entries == ["lru", "klotski[klotski_features=hot+reorder;klotski_max_group=2]", "klotski[klotski_features=none]"]
    assert policy_settings(entries[1]) == {"policy": "klotski", "klotski_features": "hot,reorder", "klotski_max_group": "2"}
    out = tmp_path / "out"
    assert main(["bench", str(TINY_PYMOE), "--policies", "klotski[klotski_features=fast]", "--out", str(out)]) == 2
    assert main(["bench", str(TINY_PYMOE), "--policies", "klotski[oops]", "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert "unknown ['fast']" in printed and "'oops' is not key=value" in printed
    assert not out.exists()
