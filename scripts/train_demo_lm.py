"""Train the demo model's architecture for a few minutes, so quantization fidelity means something.

The built-in demo checkpoint has random weights: its next-token distributions are nearly flat, so
a rounding error far below anything that matters flips the top token, and top-1 agreement (one
of ``tureen bench quant``'s fidelity figures) says little. No trained causal LM can be downloaded
here, so this script makes one: the demo's config and tokenizer, trained with transformers on the
same Python standard-library sources the tokenizer was trained on (the ``os`` module, which
``tureen bench quant`` scores by default, is not among them). A few minutes on two cores take the loss
from about 9 nats to about 3-4: confident, peaked distributions like a real model's.

    python scripts/train_demo_lm.py /tmp/demo-trained --minutes 8
    tureen bench quant /tmp/demo-trained --threads 1 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import shutil
import sysconfig
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import LlamaForCausalLM

from tureen.demo import _CORPUS_FILES, demo_model_path
from tureen.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def corpus_ids(tokenizer: Tokenizer) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in _CORPUS_FILES:  # the os module is not among them
        ids += tokenizer.encode((stdlib / name).read_text(encoding="utf-8"), add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="Where the trained checkpoint goes (created).")
    ap.add_argument("--minutes", type=float, default=8.0, help="Training time (default: 8).")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    demo = demo_model_path()
    tokenizer = Tokenizer.from_pretrained(demo)
    data = corpus_ids(tokenizer)
    model = LlamaForCausalLM.from_pretrained(demo, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget, start, step, loss_ema = args.minutes * 60, time.monotonic(), 0, None
    columns = (TextColumn("training"), BarColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=budget, status="")
        while (elapsed := time.monotonic() - start) < budget:
            frac = elapsed / budget  # warm up over the first 5%, then cosine to 10%
            lr = args.lr * min(1.0, frac / 0.05) * (0.55 + 0.45 * math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,))
            batch = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()])
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
            progress.update(task, completed=min(elapsed, budget), status=f"step {step}, loss {loss_ema:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (demo / name).exists():
            shutil.copy(demo / name, args.out / name)
    tokens = step * args.batch_size * args.seq_len
    print(f"{step} steps, {tokens:,} tokens, final loss ~{loss_ema:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
