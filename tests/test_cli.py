"""The CLI: every subcommand runs, --help works everywhere, user mistakes are friendly errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minicpm4.cli import build_parser, main
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import REAL_8B_CONFIG, require, tiny_config


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicpm4", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", [[], ["generate"], ["chat"], ["info"]])
def test_help_everywhere(cmd: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: minicpm4" in capsys.readouterr().out


def test_info_on_real_config(capsys) -> None:
    assert main(["info", "--model", str(require(REAL_8B_CONFIG))]) == 0
    out = capsys.readouterr().out
    assert "8,185,253,888" in out and "LongRoPE" in out and "32 q / 2 kv" in out


def test_info_presets(capsys) -> None:
    assert main(["info", "--preset", "minicpm4-0.5b", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "433,873,920" in out and "tied" in out and "at 4096 tokens" in out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-real-vocab")
    model = MiniCPM4ForCausalLM(tiny_config(vocab_size=73448, eos_token_id=(2, 73440),
                                            num_hidden_layers=2))
    model.init_weights(seed=0)
    model.save_pretrained(folder)
    return folder


def test_generate_from_folder_streams_and_batches(model_dir) -> None:
    res = run_cli("generate", "--model", str(model_dir), "--prompt", "Hello there",
                  "--max-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Hello there") and "6 tokens" in res.stderr
    res = run_cli("generate", "--model", str(model_dir), "--prompt", "One", "--prompt",
                  "Two words", "--max-tokens", "4", "--temperature", "0.8", "--seed", "3",
                  "--chat-template")
    assert res.returncode == 0, res.stderr
    assert "--- [0] ---" in res.stdout and "--- [1] ---" in res.stdout


def test_chat_session(model_dir) -> None:
    res = run_cli("chat", "--model", str(model_dir), "--max-tokens", "4", "--system", "Be brief",
                  stdin="hello\n/reset\nagain\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("assistant> ") == 2


def test_sparse_flags_switch_infllm_v2_on_and_off(model_dir) -> None:
    """--sparse (+ field overrides) on a dense checkpoint, in process: the same greedy text as
    dense while the prompt is below dense_len, and a working always-sparse run."""
    from minicpm4 import loading
    args = build_parser().parse_args(["generate", "--model", str(model_dir), "--sparse",
                                      "--sparse-topk", "8", "--sparse-dense-len", "-1",
                                      "--sparse-lse", "exact"])
    model, _ = loading.load_model_and_tokenizer(args)
    sc = model.config.sparse_config
    assert (sc.topk, sc.dense_len, sc.window_size) == (8, -1, 2048)
    assert model.model.layers[0].self_attn.sparse_lse == "exact"
    dense_args = build_parser().parse_args(["generate", "--model", str(model_dir), "--dense"])
    assert loading.load_model_and_tokenizer(dense_args)[0].config.sparse_config is None
    outs = []
    for extra in ([], ["--sparse"], ["--sparse-dense-len", "-1"]):
        res = run_cli("generate", "--model", str(model_dir), "--prompt", "Hello there",
                      "--max-tokens", "5", *extra)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] == outs[2]  # 7 tokens: every block is selected anyway


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/dir"], "does not exist"),
    (["generate", "--random", "tiny", "--sparse", "--dense"], "mutually exclusive"),
    (["generate", "--random", "tiny", "--sparse-topk", "0"], "sparse_config.topk"),
    (["generate", "--random", "tiny", "--dtype", "float16"], "float16 is not supported on CPU"),
    (["generate", "--random", "tiny", "--device", "cuda:0"], "CUDA is not available"),
    (["generate", "--random", "tiny", "--top-p", "0"], "top_p"),
    (["generate", "--random", "tiny", "--max-tokens", "99999"], "exceed the model context"),
    (["info", "--model", "/no/such/config.json"], "no config.json"),
])
def test_friendly_errors(args: list[str], message: str) -> None:
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert "Traceback" not in res.stderr
