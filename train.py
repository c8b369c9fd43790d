"""Train nanoGPT with its matmuls in a simulated low-precision format.

    python train.py configs/e5m2_fp8.yaml [--section.key=value ...] [--resume]
    torchrun --standalone --nproc_per_node=2 train.py configs/e5m2_fp8.yaml --train.grad_accum=2   # DDP
    python train.py --help          # every section and key with its type and default

Outputs in out/<run_name>/: config.yaml (resolved), metrics.jsonl, summary.json, git_diff.patch
(`git diff HEAD`, only with uncommitted changes), checkpoints
(ckpt_<step>.pt, at most train.max_checkpoints, and ckpt_last.pt) and W&B files when enabled.
While a run lives, out/.<run_name>.lock holds its PID and host: a second run of the same name
stops before touching anything. Every check of the config, the data and the checkpoint to resume
runs before the run directory is created or an earlier run's directory is moved aside.
Exit codes: 0 completed, 1 failed (an exception: summary.json says `failed` and why),
2 bad config / data / checkpoint or a run directory in use, 3 diverged (train.nan_patience
consecutive non-finite steps), 130 stopped by Ctrl-C / SIGTERM.
"""

import atexit
import dataclasses
import hashlib
import math
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from altgrad import checkpoint as ckpt
from altgrad import metrics as diag
from altgrad.data import DataError, DataNotFoundError, TokenBatches, check_data
from altgrad import inference
from altgrad.model import GPT, GPTConfig
from altgrad.reproducibility import get_rng_state, set_rng_state, set_seed_for_reproducibility
from altgrad.rundir import RunLock, RunLockedError, clean_partial_files, move_aside
from altgrad.runconfig import ConfigError, format_config, load_config, parse_args, save_config
from altgrad.shadow import FP32ShadowModel
from altgrad.tracking import RunLogger, git_commit, git_diff, run_versions, write_json_atomic, write_text_atomic

EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_STOPPED = 1, 2, 3, 130


def end_process(code):
    """Exit with `code`. A data-parallel process leaves without interpreter shutdown: DDP keeps the
    gloo process group (and its C++ worker threads) alive past destroy_process_group (torch 2.13),
    and its teardown during interpreter shutdown can abort (SIGABRT) a process whose run ended
    cleanly. The atexit handlers (the run lock, W&B) still run; every file is closed by then."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(message, code=EXIT_USAGE):
    print(f"error: {message}", file=sys.stderr)  # a user mistake: one line, no traceback
    end_process(code)


# ---------------------------------------------------------------------------------------
# config: YAML + --section.key=value overrides (+ --resume)
try:
    args = parse_args(sys.argv[1:])
    cfg = load_config(list(args.config_paths), args.overrides)
except ConfigError as e:
    fail(e)
if args.resume:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
tc = cfg.train

# ---------------------------------------------------------------------------------------
# devices and DDP: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
device = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
if device.startswith("cuda") and not torch.cuda.is_available():
    fail(f"train.device={tc.device} but torch sees no CUDA GPU; use --train.device=cpu")
ddp = int(os.environ.get("RANK", -1)) != -1
rank, world_size = 0, 1
if ddp:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
master = rank == 0  # only rank 0 prints, logs and checkpoints
if tc.grad_accum % world_size:
    fail(f"train.grad_accum={tc.grad_accum} must be a multiple of the {world_size} DDP processes")
accum = tc.grad_accum // world_size  # micro-batches per rank per step (global batch as nanoGPT)
device_type = "cuda" if device.startswith("cuda") else "cpu"
dtype = tc.dtype if tc.dtype != "auto" else ("bf16" if device_type == "cuda" else "fp32")
if dtype == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
    fail("train.dtype=bf16 needs a GPU with bf16 (Ampere or newer); use --train.dtype=fp32")
autocast = nullcontext() if dtype == "fp32" else torch.autocast(device_type, dtype=torch.bfloat16)
# TF32 only when asked (train.tf32): an "fp32" matmul here means fp32, and the FP32 shadow
# model always runs without it (altgrad.shadow)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32 and device_type == "cuda"
# what the matmuls that are not simulated (unquantized roles and layers, attention) run in
hp_matmul = "bf16 (autocast)" if dtype == "bf16" else ("tf32" if tc.tf32 and device_type == "cuda" else "fp32")

# ---------------------------------------------------------------------------------------
# data and model: the same seed gives every format the same init and the same batches
try:  # sizes, token ids against the vocabulary, meta.pkl: all before anything is written
    meta = check_data(cfg.data_dir, cfg.model.block_size, cfg.model.vocab_size)
except (DataNotFoundError, DataError) as e:
    fail(e)
if cfg.model.vocab_size is None:  # resolve from meta.pkl so config.yaml records the real size
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
set_seed_for_reproducibility(tc.seed)
train_data = TokenBatches(cfg.data_dir, "train", cfg.model.block_size, tc.batch_size, device,
                          seed=tc.seed, rank=rank, world_size=world_size)
model = GPT(GPTConfig(**dataclasses.asdict(cfg.model)))
quant_config = cfg.quant  # a QuantizationConfig, validated when the config was read; None: baseline
if quant_config is not None:
    from altgrad.linear import round_master_weights, set_stats_level, set_weight_cache, sync_amax_history, weight_updated
    from altgrad.surgery import describe_quantization, quantize_model, quantized_layers

    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantize_model(model, config=quant_config)
    set_weight_cache(model, accum > 1 and not tc.compile)  # cast each weight once per step (eager)
    # a pattern that matches no layer is almost always a typo: say so; quantizing nothing is an error
    for i, rule in enumerate(quant_config.layer_rules):
        if master and not any(rule.matches(n) for n in linear_names):
            print(f"warning: quant.layer_rules[{i}] pattern {rule.pattern!r} matches no Linear layer "
                  f"(layers: {', '.join(linear_names[:4])}, ...)", file=sys.stderr)
    if not any(True for _ in quantized_layers(model)):
        fail("quant: this config quantizes none of the model's Linear layers; use quant: null for the "
             "high-precision baseline, or fix quant.default_format / layer_rules")

# ---------------------------------------------------------------------------------------
# run directory: lock it (rank 0), then resume from its newest readable checkpoint, or move an
# earlier run aside. Nothing is written or moved until every check has passed.
run_dir = cfg.run_dir
if master:
    lock = RunLock(run_dir)
    try:
        stale = lock.acquire()
    except (RunLockedError, OSError) as e:
        fail(e)
    atexit.register(lock.release)
    if stale:
        print(f"note: took over the stale lock of pid {stale.get('pid')} on host {stale.get('host')} "
              f"(that run is gone)")
# the run's state: what a checkpoint stores beside the weights, optimizer, RNG and data position
run = {"step": 0, "best_val_loss": None, "best_val_step": None, "last_val_loss": None, "last_val_step": None,
       "last_train_loss": None, "nonfinite_streak": 0, "skipped_steps": 0, "wall_time_s": 0.0}
resume_path = checkpoint = None
if tc.resume:
    try:  # a damaged newest checkpoint falls back to the next older one, with a warning
        resume_path, checkpoint = ckpt.load_latest_checkpoint(
            run_dir, map_location="cpu", warn=lambda msg: print(msg, file=sys.stderr) if master else None)
    except ckpt.CheckpointError as e:
        fail(e)
if checkpoint is not None:
    for section in ("model", "quant"):  # train/log may change on resume (e.g. more steps)
        if checkpoint["config"][section] != cfg.to_dict()[section]:
            fail(f"{section}: differs from the checkpoint's {resume_path} ({checkpoint['config'][section]}); "
                 f"resume with the same {section} section or use another log.run_name")
    saved_seed = checkpoint["config"]["train"]["seed"]
    if saved_seed != tc.seed:  # the seed chose the initial weights and the data order
        fail(f"train.seed={tc.seed} differs from the checkpoint's {resume_path} seed {saved_seed}; "
             f"resume with --train.seed={saved_seed} or use another log.run_name")
    model.load_state_dict(checkpoint["model"])  # QuantizedLinear scales/AmaxHistory are buffers
    train_data.load_state_dict(checkpoint["data"])
    set_rng_state(checkpoint["rng"])
    run.update({key: checkpoint.get(key, run[key]) for key in run})
start_step, wall_before = run["step"], run["wall_time_s"]
if master:
    removed = clean_partial_files(run_dir)  # temp files of writes killed mid-way (we hold the lock)
    if removed:
        print(f"note: removed {len(removed)} partial file(s) of an interrupted write: "
              f"{', '.join(p.name for p in removed)}")
    if resume_path is not None:
        print(f"resuming from {resume_path} at step {start_step}")
    else:
        if tc.resume:
            print(f"train.resume: no checkpoint in {run_dir}, starting from step 0")
        if (run_dir / "metrics.jsonl").exists() or (run_dir / "summary.json").exists() \
                or ckpt.checkpoint_candidates(run_dir):
            # a fresh run never overwrites an earlier one: its directory is kept beside, renamed
            kept = move_aside(run_dir)
            print(f"note: {run_dir} held an earlier run; moved it to {kept}"
                  + ("" if tc.resume else " (use --resume to continue one)"))
    run_dir.mkdir(parents=True, exist_ok=True)
model.to(device)
raw_model = model  # state_dict, diagnostics and shadow use the unwrapped module
optimizer = raw_model.configure_optimizers(tc.weight_decay, tc.lr, tc.betas, device_type)
params = [p for p in raw_model.parameters() if p.requires_grad]
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    del checkpoint
tokens_per_step = tc.batch_size * cfg.model.block_size * tc.grad_accum
versions, commit = run_versions(), git_commit()
# the code that made the run: HEAD plus, with a dirty tree, `git diff HEAD` in git_diff.patch
diff = git_diff() if commit is not None and commit.endswith("-dirty") else None
device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"{torch.get_num_threads()} threads"
t_start = time.time()
logger = None


def wall_time():
    return wall_before + time.time() - t_start


def write_summary(status, diverged_step=None, **extra):
    write_json_atomic(run_dir / "summary.json", extra | {
        "run_name": cfg.log.run_name, "status": status, "steps": run["step"], "diverged_step": diverged_step,
        "final_train_loss": run["last_train_loss"], "final_val_loss": run["last_val_loss"],
        "final_val_step": run["last_val_step"], "best_val_loss": run["best_val_loss"],
        "best_val_step": run["best_val_step"], "skipped_steps": run["skipped_steps"], "wall_time_s": wall_time(),
        "num_params": raw_model.get_num_params(), "tokens_per_step": tokens_per_step, "versions": versions,
        "device": f"{device} ({device_name})", "dtype": dtype, "high_precision_matmul": hp_matmul,
        "world_size": world_size, "git_commit": commit, "git_diff": "git_diff.patch" if diff else None,
        "pid": os.getpid(), "host": os.uname().nodename, "config": cfg.to_dict()})


def on_crash(exc_type, exc, tb):
    """Any exception that ends the run: the traceback, then summary.json `failed` with the reason."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        if ddp:
            end_process(EXIT_STOPPED)
        return
    traceback.print_exception(exc_type, exc, tb)
    text = str(exc).strip()
    reason = f"{exc_type.__name__}: {text.splitlines()[0]}" if text else exc_type.__name__
    if master:
        try:
            write_summary("failed", error=reason)
            if logger is not None:
                logger.close({"status": "failed"}, exit_code=EXIT_FAILED)
        except Exception as e:  # e.g. the disk is still full
            print(f"could not record the failure in {run_dir / 'summary.json'}: {e}", file=sys.stderr)
        print(f"failed at step {run['step']}: {reason} -> {run_dir}", file=sys.stderr)
    if ddp:
        end_process(EXIT_FAILED)


if master or ddp:
    sys.excepthook = on_crash  # from here on a crash is recorded (exit code 1, Python's own)
if master:
    save_config(cfg, run_dir / "config.yaml")
    if diff:
        write_text_atomic(run_dir / "git_diff.patch", diff)
    print(format_config(cfg), end="")
    if quant_config is not None:
        print(describe_quantization(raw_model))
    logger = RunLogger(run_dir, config=cfg.to_dict(), project=cfg.log.wandb_project, run_name=cfg.log.run_name,
                       tags=cfg.log.tags, wandb_mode=cfg.log.wandb_mode, entity=cfg.log.wandb_entity,
                       resume_step=start_step if resume_path is not None else None)
if tc.compile:
    model = torch.compile(model)
if ddp:
    # quantized: amax histories are max-reduced by sync_amax_history, not copied from rank 0
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None,
                broadcast_buffers=quant_config is None)

# ---------------------------------------------------------------------------------------
# diagnostics (rank 0): quantization stats, update effect, dead MLP units, FP32 shadow
tracker = dead = shadow = None
if master and tc.metrics:
    tracker = diag.UpdateTracker(raw_model)
    dead = diag.DeadNeuronTracker(raw_model, cfg.log.dead_neuron_threshold, cfg.log.dead_neuron_window)
if master and tc.shadow_interval:
    if ddp:  # rank 0's gradients are the all-reduced ones; its own batches alone would not match
        print("note: train.shadow_interval is ignored under DDP")
    else:
        shadow = FP32ShadowModel(raw_model)


def save(numbered):
    checkpoint = run | {"wall_time_s": wall_time(), "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": get_rng_state(), "data": train_data.state_dict(), "config": cfg.to_dict()}
    ckpt.save_run_checkpoint(checkpoint, run_dir, run["step"], max_checkpoints=tc.max_checkpoints, numbered=numbered)


@torch.no_grad()
def evaluate():
    """Mean val loss over eval_iters batches: the same batches at every eval (fixed seed), so
    curves and formats compare without sampling noise, and the training RNG is untouched
    (altgrad.inference.loss_sum, which sample.py --eval runs too)."""
    if quant_config is not None:  # evaluation casts record no counts or rel_err (no metrics read them)
        set_stats_level(raw_model, "scale")
    total = inference.loss_sum(raw_model, cfg, "val", device, rank=rank, world_size=world_size)
    if ddp:
        dist.all_reduce(total)
    return (total / (tc.eval_iters * world_size)).item()


def eval_and_record(record):
    """Evaluate (every rank), track the best, add val/* to rank 0's record for this step."""
    loss = evaluate()
    run.update(last_val_loss=loss, last_val_step=run["step"])
    if master:
        if run["best_val_loss"] is None or loss < run["best_val_loss"]:
            run.update(best_val_loss=loss, best_val_step=run["step"])
        record.update({"val/loss": loss, "val/ppl": math.exp(min(loss, 80.0))})


def print_val():
    print(f"step {run['step']:>6}/{tc.max_steps} | val loss {run['last_val_loss']:.4f} | "
          f"best {run['best_val_loss']:.4f} @ {run['best_val_step']}")


def total_norm():
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------
# training loop: `step` counts finished optimizer steps (skipped ones included)
if master:
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters | {tokens_per_step} tokens/step | "
          f"{device} ({device_name}) | high-precision matmuls {hp_matmul} | world {world_size} | run dir {run_dir}")
status, diverged_step, exit_code, aborted = "completed", None, 0, False
train_time, timed_steps, loop_t0, alert_shown = 0.0, 0, time.time(), {}
stop = {"signal": None}  # set by the signal handler


def request_stop(signum, frame):
    """Ctrl-C / SIGTERM: finish the current step, then save and stop; a second one aborts."""
    if stop["signal"] is not None:
        raise KeyboardInterrupt
    stop["signal"] = signum
    if master:
        print(f"{signal.Signals(signum).name}: stopping after this step (again to abort)", file=sys.stderr)


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
if master:
    write_summary("running")
try:
    if run["step"] == 0:  # the initial loss, ln(vocab) or so, anchors every curve
        record = {}
        eval_and_record(record)
        if master:
            logger.log(0, record)
            print_val()
    while run["step"] < tc.max_steps:
        step = run["step"]
        # ---- one optimizer step: accum micro-batches per rank, then clip, check, update
        t0 = time.time()
        lr = tc.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        log_now = (step + 1) % tc.log_interval == 0 or step + 1 == tc.max_steps
        shadow_now = shadow is not None and (step + 1) % tc.shadow_interval == 0
        batches, loss_sum = [], torch.zeros((), device=device)
        if quant_config is not None:  # counts and rel_err are read on logging steps only
            set_stats_level(raw_model, "full" if log_now and tracker is not None else "scale")
        for micro in range(accum):
            x, y = train_data.next_batch()
            if shadow_now:
                batches.append((x, y))
            if ddp:  # all-reduce gradients on the last micro-batch only
                model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                _, loss = model(x, y)
                loss = loss / accum
            loss_sum += loss.detach().float()
            loss.backward()
            if ddp and quant_config is not None:  # every rank scales with the group's max amax
                sync_amax_history(raw_model)
        if ddp:  # mean loss, and whether any rank was asked to stop: ranks must stop together
            flags = torch.stack([loss_sum, torch.tensor(float(stop["signal"] is not None), device=device)])
            dist.all_reduce(flags)
            loss_sum = flags[0] / world_size
            # stop after this step only if the ranks agreed here: a signal that arrives later reaches
            # a rank still in this step's Python code at once, but one already blocked in the next
            # step's gradient all-reduce only after it, so each rank's own flag can differ by a step
            stop_agreed = flags[1].item() > 0
            if stop_agreed and stop["signal"] is None:
                stop["signal"] = signal.SIGTERM
        record = {}
        if shadow_now:  # before clipping: clipping rescales the gradient and would shift the SNR
            record.update(shadow.compare(raw_model, batches, accum))
        if log_now and tracker is not None:
            record.update(diag.grad_norms(raw_model))
        norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0 else total_norm()
        # one host sync per step: the skip decision needs the values (identical on every rank)
        train_loss, grad_norm = torch.stack([loss_sum, norm.float()]).tolist()
        run["last_train_loss"] = train_loss
        if math.isfinite(train_loss) and math.isfinite(grad_norm):
            if log_now and tracker is not None:
                tracker.before_step()
            optimizer.step()
            if quant_config is not None:  # master_weights: store the weights in their format
                round_master_weights(raw_model)
            if log_now and tracker is not None:
                record.update(tracker.after_step())
            run["nonfinite_streak"] = 0
        else:  # skip: a non-finite step must not reach the weights or Adam's moments
            run["nonfinite_streak"] += 1
            run["skipped_steps"] += 1
            if master:
                print(f"step {step + 1}: non-finite loss {train_loss} / grad norm {grad_norm}; "
                      f"skipped ({run['nonfinite_streak']}/{tc.nan_patience})")
        optimizer.zero_grad(set_to_none=True)
        if quant_config is not None:  # every step casts its weights once, skipped steps too (as a resume would)
            weight_updated(raw_model)
        if dead is not None:
            dead.step()
        step = run["step"] = step + 1
        if device_type == "cuda":
            torch.cuda.synchronize()
        train_time, timed_steps = train_time + time.time() - t0, timed_steps + 1

        # ---- eval, logging, checkpoint: one metrics record per step, then the state after it
        if master and log_now and tracker is not None:  # the step's casts, before evaluation casts again
            record.update(diag.quant_metrics(raw_model))
        eval_now = step % tc.eval_interval == 0 or step == tc.max_steps
        if eval_now:
            eval_and_record(record)
        if master and (log_now or record or run["nonfinite_streak"]):
            step_s = train_time / timed_steps
            record.update({"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                           "train/skipped_steps": run["skipped_steps"], "perf/step_ms": step_s * 1e3,
                           "perf/tokens_per_s": tokens_per_step / step_s})
            mfu = raw_model.estimate_mfu(tc.batch_size * accum, step_s) if device_type == "cuda" else None
            if mfu is not None:
                record["perf/mfu"] = mfu
            if log_now and tracker is not None:
                record.update(dead.metrics())
            logger.log(step, record)
            for alert in diag.alerts(record, cfg.log.overflow_threshold, cfg.log.bit_stall_threshold):
                kind = alert.split(":")[0]  # repeat an alert kind once per eval interval, not every log line
                if step - alert_shown.get(kind, -tc.eval_interval) >= tc.eval_interval:
                    alert_shown[kind] = step
                    print(f"step {step} alert: {alert}")
            if log_now:
                eta = (time.time() - loop_t0) / (step - start_step) * (tc.max_steps - step)
                mfu_text = f" | mfu {mfu:6.2%}" if mfu is not None else ""
                print(f"step {step:>6}/{tc.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f}"
                      f" | {step_s * 1e3:7.1f} ms | {tokens_per_step / step_s / 1e3:6.1f}k tok/s{mfu_text}"
                      f" | eta {fmt_time(eta)}", flush=True)
                train_time, timed_steps = 0.0, 0
            if eval_now:
                print_val()
        if master and tc.checkpoint_interval and step % tc.checkpoint_interval == 0:
            save(numbered=True)
        if run["nonfinite_streak"] >= tc.nan_patience:  # diverged_step: the first of the non-finite steps
            status, diverged_step, exit_code = "diverged", step - run["nonfinite_streak"] + 1, EXIT_DIVERGED
            break
        if (stop_agreed if ddp else stop["signal"] is not None):
            status, exit_code = "stopped", EXIT_STOPPED
            break
except KeyboardInterrupt:  # a second Ctrl-C: stopped mid-step, so the state is not saved
    status, exit_code, aborted = "stopped", EXIT_STOPPED, True

# ---------------------------------------------------------------------------------------
# the end: DDP desync check, final checkpoint (ckpt_last.pt), summary, one line
extra = {}
if ddp and not aborted:  # every rank must hold bit-identical weights after all-reduced steps
    raw_bytes = (p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() for p in params)
    digest = hashlib.sha256(b"".join(raw_bytes)).hexdigest()
    digests = [None] * world_size
    dist.all_gather_object(digests, digest)
    extra["ddp_ranks_agree"] = len(set(digests)) == 1
    if master and not extra["ddp_ranks_agree"]:
        print(f"warning: DDP ranks ended with different weights ({digests})", file=sys.stderr)
if master:
    step, best_val, last_val = run["step"], run["best_val_loss"], run["last_val_loss"]
    saved_here = tc.checkpoint_interval and step % tc.checkpoint_interval == 0
    if step > start_step and not saved_here and not aborted:
        save(numbered=False)
    write_summary(status, diverged_step, **extra)
    logger.close({"status": status, "best_val_loss": best_val, "final_val_loss": last_val}, exit_code=exit_code)
    if status == "diverged":
        print(f"diverged: {tc.nan_patience} consecutive non-finite steps from step {diverged_step}; "
              f"state saved in {run_dir} (exit code {EXIT_DIVERGED})", file=sys.stderr)
    else:
        val_text = (f"val loss {last_val:.4f} @ step {run['last_val_step']} (best {best_val:.4f} @ "
                    f"{run['best_val_step']})"
                    if last_val is not None else "no evaluation yet")
        print(f"{status} at step {step} in {fmt_time(wall_time())}: {val_text} -> {run_dir}")
end_process(exit_code)
