"""Training tokens/s of one forward + backward + AdamW step vs transformers' LlamaForCausalLM
(issue 3 #5).

Both models hold the same random weights (ours as MiniCPM4, theirs as Llama with the μP
scalars folded in, `model/llama_export.py`), see the same batch, and run in the same process,
alternating (which goes first flips every repetition). One step is
    zero_grad; [autocast] loss = mean CE over all B x T targets; loss.backward(); AdamW.step()
 - ours: `MiniCPM4ForCausalLM.forward(labels_BT=...)`, the path `minicpm4 train` takes (the
   trunk, then the LM head fused with the cross-entropy, no fp32 logits kept), divided by
   the target count;
 - transformers: `model(input_ids, labels=..., shift_labels=targets, use_cache=False).loss`,
   its own loss path (`ForCausalLMLoss`: fp32 logits, `F.cross_entropy` over every position).
The targets are the next tokens of a random stream; the step-0 losses (identical weights) are
printed as a check that both compute the same thing. That first step of each model is the
warm-up (it allocates the optimizer state; its time is printed); `--warmup N` runs N - 1 more.
Then up to `--steps` timed repetitions, at least 3, fewer than asked only when the run would
overrun `--time-budget` (the default keeps a run under 5 minutes on a busy 2-core VM).
Both optimizers are `torch.optim.AdamW(fused=True)` with the same hyper-parameters over the
same parameter count. bfloat16 means fp32 weights and optimizer, forward under
`torch.autocast("cpu", bfloat16)`.

Default model ("train-small"): hidden 512, 8 layers, 8 query / 2 KV heads (head dim 64),
SwiGLU 1536, the real 73448-token vocabulary, untied head; batch 4 x 512 tokens. The real
vocabulary keeps the LM head and the cross-entropy over [2048, 73448] logits in the measurement,
as in real MiniCPM4 training, while 8 layers of width 512 keep the trunk at ~40% of the matmul
FLOPs (24.1M trunk vs 37.6M head weights, plus attention), so the head does not decide the
result alone, and a default run stays within a few minutes on 2 cores. Presets from
`loading.PRESETS` are untied too (the Llama export unties the head, so a tied MiniCPM4 would
carry one matrix fewer through AdamW than its Llama twin).

Prints per dtype: seconds per step and tokens/s of both (medians), and the speedup: the median
over repetitions of transformers' step time / ours in that repetition (the two ran back to
back, so load drifting on a shared machine cancels); and last
    RESULT train_speedup_vs_hf=<min over dtypes of that speedup>
`--ablation` adds two variants of ours to the alternation: "ours-plain" (plain autograd in the
trunk, `MINICPM4_TRAINING_KERNELS=0`, and `F.cross_entropy` on the model's fp32 logits: the code
before the training kernels) and "ours-ce-only" (plain trunk, fused LM head + CE).
`--profile` adds, per dtype, one extra step of each under torch.profiler: its forward /
backward / optimizer split (`record_function`) and its top ops by self CPU time.
Usage: python benchmarks/train_step.py [--dtypes float32,bfloat16] [--seq-len 512]
       [--batch-size 4] [--warmup 1] [--steps 5] [--time-budget 270]
       [--preset train-small] [--ablation] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minicpm4.loading import PRESETS  # noqa: E402
from minicpm4.kernels import matmul  # noqa: E402
from minicpm4.model.config import ModelConfig  # noqa: E402
from minicpm4.model.llama_export import llama_config_dict, llama_state_dict  # noqa: E402
from minicpm4.model.transformer import MiniCPM4ForCausalLM  # noqa: E402


def train_small() -> ModelConfig:
    return ModelConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                       max_position_embeddings=4096, torch_dtype="float32")


CONFIGS = {"train-small": train_small, **PRESETS}


def build_pair(cfg: ModelConfig):
    """(ours, transformers' Llama) with identical fp32 weights, in train mode."""
    import transformers
    ours = MiniCPM4ForCausalLM(cfg)
    ours.init_weights(seed=0)
    hf_cfg = transformers.LlamaConfig(**llama_config_dict(cfg))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    state = {k: v.clone() for k, v in llama_state_dict(ours, cfg).items()}
    hf.load_state_dict(state, strict=False, assign=True)
    hf.model.rotary_emb.__init__(hf_cfg)  # buffers were created on meta
    return ours.train(), hf.train()


def make_step(name: str, model, inputs_BT, targets_BT, dtype: torch.dtype):
    """A closure running one training step of `name` ("ours", "hf", or an `--ablation`
    variant of ours: "ours-plain", "ours-ce-only"); returns the loss as a float."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    autocast = dtype != torch.float32
    training_kernels = name not in ("ours-plain", "ours-ce-only")  # no effect on "hf"

    def forward_loss() -> torch.Tensor:
        if name == "hf":
            return model(input_ids=inputs_BT, labels=targets_BT, shift_labels=targets_BT,
                         use_cache=False).loss
        if name == "ours-plain":  # model logits (fp32) + F.cross_entropy, plain autograd
            logits_BTV = model(inputs_BT)
            return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
        return model(inputs_BT, labels_BT=targets_BT).ntp / targets_BT.numel()

    def step() -> float:
        saved, matmul.TRAINING_KERNELS = matmul.TRAINING_KERNELS, training_kernels
        try:
            opt.zero_grad(set_to_none=True)
            with torch.profiler.record_function(f"{name}.forward"), \
                    torch.autocast("cpu", dtype=dtype, enabled=autocast):
                loss = forward_loss()
            with torch.profiler.record_function(f"{name}.backward"):
                loss.backward()
            with torch.profiler.record_function(f"{name}.optimizer"):
                opt.step()
        finally:
            matmul.TRAINING_KERNELS = saved
        return loss.item()

    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def profile_steps(steps: dict, dtype_name: str, rows: int = 20) -> None:
    """One extra step of each model under torch.profiler: the forward / backward / optimizer
    split (record_function regions of `make_step`) and the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        averages = prof.key_averages()
        phases = {e.key.rsplit(".", 1)[1]: e.cpu_time_total / 1e6 for e in averages
                  if e.key.rsplit(".", 1)[-1] in ("forward", "backward", "optimizer")}
        note = " (ours' forward includes the LM head's gradient matmuls)" \
            if name in ("ours", "ours-ce-only") else ""
        print(f"[{dtype_name}] profile of one {name} step: " +
              ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()) + note)
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows,
                             max_name_column_width=55))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="train-small", choices=sorted(CONFIGS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps per model (>= 1; the first is the step-0 loss check)")
    ap.add_argument("--steps", type=int, default=5,
                    help="timed steps per model (alternating repetitions; median)")
    ap.add_argument("--time-budget", type=float, default=270.0,
                    help="seconds for the whole run: after 3 repetitions, a dtype stops "
                         "early rather than overrun its share")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ablation", action="store_true",
                    help="also time ours-plain and ours-ce-only (see the module docstring)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cfg = CONFIGS[args.preset]().replace(tie_word_embeddings=False)
    B, T = args.batch_size, args.seq_len
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    head = cfg.vocab_size * cfg.hidden_size
    trunk = cfg.num_parameters(include_embedding=False) - head
    print(f"model {args.preset}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, ffn "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size} (untied); matmul params: trunk "
          f"{trunk / 1e6:.1f}M, LM head {head / 1e6:.1f}M; batch {B} x seq {T} = {B * T} "
          f"tokens/step; {args.warmup} warm-up + up to {args.steps} timed steps per model")
    stream = torch.randint(3, cfg.vocab_size, (B, T + 1),
                           generator=torch.Generator().manual_seed(1))
    inputs_BT, targets_BT = stream[:, :-1].contiguous(), stream[:, 1:].contiguous()
    ours, hf = build_pair(cfg)
    models = {"ours": ours, "transformers": hf}
    if args.ablation:
        models["ours-plain"] = copy.deepcopy(ours)
        models["ours-ce-only"] = copy.deepcopy(ours)
    initial = {name: {k: v.clone() for k, v in m.state_dict().items()}
               for name, m in models.items()}
    speedups = []
    dtype_names = args.dtypes.split(",")
    for index, dtype_name in enumerate(dtype_names):
        dtype = getattr(torch, dtype_name)
        t_dtype = time.perf_counter()
        allowed_s = (args.time_budget - (t_dtype - t_start)) / (len(dtype_names) - index)
        for name, model in models.items():  # every dtype starts from the same weights
            model.load_state_dict(initial[name])
        steps = {name: make_step("hf" if name == "transformers" else name, model, inputs_BT,
                                 targets_BT, dtype) for name, model in models.items()}
        warm: dict[str, list[float]] = {name: [] for name in steps}
        first = {}
        for name, step in steps.items():
            t0 = time.perf_counter()
            first[name] = step()
            warm[name].append(time.perf_counter() - t0)
        print(f"[{dtype_name}] step-0 loss (same weights): " +
              ", ".join(f"{name} {loss:.5f}" for name, loss in first.items()))
        for _ in range(args.warmup - 1):
            for name, step in steps.items():
                warm[name].append(timed(step))
        times: dict[str, list[float]] = {name: [] for name in steps}
        for rep in range(args.steps):
            t_rep = time.perf_counter()
            order = list(steps) if rep % 2 == 0 else list(steps)[::-1]
            for name in order:
                times[name].append(timed(steps[name]))
            now = time.perf_counter()
            if rep + 1 >= 3 and rep + 1 < args.steps and \
                    now + (now - t_rep) - t_dtype > allowed_s:
                print(f"[{dtype_name}] time budget: stopping after {rep + 1} of {args.steps} "
                      "timed repetitions")
                break
        med = {name: statistics.median(v) for name, v in times.items()}
        for name in steps:
            print(f"[{dtype_name}] {name:12s} {B * T / med[name]:8.1f} tok/s  "
                  f"({med[name]:.3f} s/step; timed " +
                  ", ".join(f"{t:.2f}" for t in times[name]) + "; warm-up " +
                  ", ".join(f"{t:.2f}" for t in warm[name]) + ")")
        for name in steps:
            if name == "transformers":
                continue
            # Ratio per repetition (the two steps ran back to back), then the median: robust
            # to the machine's load drifting between repetitions.
            ratios = [h / o for h, o in zip(times["transformers"], times[name])]
            speedup = statistics.median(ratios)
            if name == "ours":
                speedups.append(speedup)
            print(f"[{dtype_name}] {name} / transformers tokens/s: x{speedup:.3f} (median of "
                  "per-repetition ratios " + ", ".join(f"{r:.3f}" for r in ratios) +
                  f"; ratio of the medians x{med['transformers'] / med[name]:.3f})")
        if args.profile:
            profile_steps(steps, dtype_name)
        del steps
    print(f"total time {time.perf_counter() - t_start:.0f}s")
    print(f"RESULT train_speedup_vs_hf={min(speedups):.3f}")


if __name__ == "__main__":
    main()
