"""Loading holds one copy of the weights (issue 2: "an 8B checkpoint must load in about its own
size of RAM"). Peak resident memory is read from /proc in a fresh subprocess per case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minicpm4.model.config import ModelConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")

PROBE = """
import sys, torch
from minicpm4.model.transformer import MiniCPM4ForCausalLM
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
for dt in (torch.float32, torch.bfloat16):  # warm up the op libraries before measuring
    torch.randn(64, 64).to(dt).sum()
from minicpm4.model.config import ModelConfig
with torch.device('meta'):  # first use of the meta device imports ~70 MB of machinery
    MiniCPM4ForCausalLM(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, eos_token_id=(2,)))
base = status('VmRSS')
model = MiniCPM4ForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
for p in model.parameters():  # touch every page of every weight
    p.sum()
size = sum(p.numel() * p.element_size() for p in model.parameters())
largest = max(p.numel() for p in model.parameters())
print(size, status('VmHWM') - base, largest)
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    cfg = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      eos_token_id=(2,), torch_dtype="float32")
    model = MiniCPM4ForCausalLM(cfg)
    model.init_weights(seed=0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = tmp_path_factory.mktemp(f"mem-{dtype}")
        model.save_pretrained(out[dtype], dtype=dtype)
    return out


@pytest.mark.parametrize("stored, loaded", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                            ("bfloat16", "float32"), ("float32", "bfloat16")])
def test_peak_memory_is_one_model_plus_one_tensor(checkpoints, stored, loaded) -> None:
    res = subprocess.run([sys.executable, "-c", PROBE, str(checkpoints[stored]), loaded],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    size, peak, largest = map(int, res.stdout.split())
    source_bytes = 4 if stored == "float32" else 2
    allowance = largest * source_bytes + 32 * 2**20  # one source tensor + allocator slack
    print(f"{stored}->{loaded}: model {size / 2**20:.0f} MiB, peak growth "
          f"{peak / 2**20:.0f} MiB ({peak / size:.2f}x)")
    assert peak <= size + allowance
