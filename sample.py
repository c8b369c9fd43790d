"""Sample from a trained run (as nanoGPT's sample.py), or evaluate its checkpoint.

    python sample.py --out_dir=out/e5m2_fp8                        # 10 samples of 500 tokens
    python sample.py --out_dir=out/e5m2_fp8 --start="ROMEO:" --num_samples=3 --max_new_tokens=200 \
        --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --out_dir=out/e5m2_fp8 --start=FILE:prompt.txt
    python sample.py --out_dir=out/e5m2_fp8 --eval                 # val loss of the checkpoint
    python sample.py --out_dir=out/e5m2_fp8 --eval --split=train --eval_iters=200

The model comes from the run's newest readable checkpoint (or --ckpt=FILE), rebuilt from the
checkpoint's own config: a quantized run samples and evaluates in its simulated formats. Text is
encoded with the data set's meta.pkl (char-level; the run's data directory, or --data_dir).
`--eval` prints the mean loss over `--eval_iters` batches (default: the run's train.eval_iters)
drawn as train.py draws them, so on the same device it equals the val loss train.py logged at
that checkpoint's step. Exit codes: 0 done, 2 bad input (one line on stderr).
"""

import argparse
import sys
from pathlib import Path

import torch

from altgrad.checkpoint import CheckpointError
from altgrad.data import DataError, DataNotFoundError, check_data, load_meta
from altgrad.inference import autocast_for, load_run_model, mean_loss
from altgrad.runconfig import ConfigError


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python sample.py", description=__doc__.split("\n")[0])
    p.add_argument("run", nargs="?", metavar="RUN_DIR", help="the run directory (same as --out_dir)")
    p.add_argument("--out_dir", help="the run directory, out/<run_name>")
    p.add_argument("--ckpt", help="a checkpoint file instead of the run's newest")
    p.add_argument("--start", default="\n", help='prompt text, or FILE:path (default: a newline)')
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; below 1 is more conservative")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data_dir", help="data directory with meta.pkl (default: the run's)")
    p.add_argument("--eval", action="store_true", help="print the checkpoint's loss instead of sampling")
    p.add_argument("--split", choices=("val", "train"), default="val", help="--eval: which split")
    p.add_argument("--eval_iters", type=int, help="--eval: batches (default: the run's train.eval_iters)")
    args = p.parse_args(argv)
    for name, low in (("num_samples", 1), ("max_new_tokens", 0), ("top_k", 0), ("seed", 0)):
        if getattr(args, name) < low:
            fail(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not args.temperature > 0:
        fail(f"--temperature must be > 0, got {args.temperature}")
    if args.eval_iters is not None and args.eval_iters < 1:
        fail(f"--eval_iters must be >= 1, got {args.eval_iters}")
    if not (args.run or args.out_dir or args.ckpt):
        fail("name the run: python sample.py --out_dir=out/<run_name> (or --ckpt=FILE)")
    if args.run and args.out_dir and Path(args.run) != Path(args.out_dir):
        fail(f"two run directories given ({args.run}, {args.out_dir}); give one")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device={args.device} but torch sees no CUDA GPU; use --device=cpu")
    source = args.ckpt or args.out_dir or args.run
    try:
        model, cfg, ckpt_path, step = load_run_model(source, device,
                                                     warn=lambda msg: print(msg, file=sys.stderr))
    except (CheckpointError, ConfigError) as e:
        fail(e)
    data_dir = Path(args.data_dir) if args.data_dir else cfg.data_dir

    if args.eval:
        try:
            check_data(data_dir, cfg.model.block_size, cfg.model.vocab_size)
        except (DataError, DataNotFoundError) as e:
            fail(e)
        iters = args.eval_iters or cfg.train.eval_iters
        loss = mean_loss(model, cfg, args.split, device, iters, data_dir=data_dir)
        print(f"{args.split} loss {loss:.4f} ({loss!r}) over {iters} batches of {cfg.train.batch_size}x"
              f"{cfg.model.block_size} tokens | {ckpt_path} (step {step})")
        return 0

    try:
        meta = load_meta(data_dir)
    except (DataError, DataNotFoundError) as e:
        fail(e)
    if meta is None or "stoi" not in meta or "itos" not in meta:
        fail(f"{data_dir} has no char-level meta.pkl (stoi/itos) to encode the prompt with; "
             "pass --data_dir=<the data the run trained on>")
    stoi, itos = meta["stoi"], meta["itos"]
    start = args.start
    if start.startswith("FILE:"):
        try:
            start = Path(start[5:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--start={args.start}: cannot read it ({e})")
    unknown = sorted({c for c in start if c not in stoi})
    if unknown:
        fail(f"--start has characters outside the run's vocabulary: {''.join(unknown)!r}")
    if not start:
        fail("--start is empty; give at least one character (default: a newline)")
    idx = torch.tensor([[stoi[c] for c in start]], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast_for(cfg, device):
        for _ in range(args.num_samples):
            out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, generator=generator)
            print("".join(itos[int(i)] for i in out[0].tolist()))
            print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())
