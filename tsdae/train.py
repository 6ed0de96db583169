"""The TSDAE training loop, run by every Ray Train worker, and the helpers it is built from."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tsdae.config import ModelConfig, TrainConfig
from tsdae.export import export_decoder, export_encoder
from tsdae.model import build_tsdae

STATE_FILE = "state.pt"


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, bit for bit: equal digests mean identical replicas."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _all_gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sum_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _save_state(path: Path, model, optimizer, step: int) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path / STATE_FILE)


def _report(metrics: dict, checkpoint_dir: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    """Train TSDAE on this worker's shard of the "train" dataset.

    config: {"model": ModelConfig, "train": TrainConfig, "max_length": int, "threads": int,
    "steps_per_epoch": int | None (for progress and max-steps bookkeeping)}.
    The dataset rows carry `noisy_ids` and `target_ids` (token id lists, no padding); the collate
    function pads them on the right. Every rank sees the same number of batches (equal split), so the
    DDP all-reduces line up. Rank 0 reports checkpoints: `state.pt` (model, optimizer, step), and at the
    end `encoder/` (sentence-transformers + Hugging Face), `decoder/`, `metrics.jsonl`, `summary.json`.
    """
    import ray.train
    import ray.train.torch

    from pipeline import make_collate_fn

    model_cfg: ModelConfig = config["model"]
    train_cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train_cfg.seed)  # same decoder-only init on every rank (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("threads", 1))))

    # 1. Build: model (restored from the last checkpoint if Ray restarted us), DDP, optimizer.
    model, tokenizer = build_tsdae(model_cfg)
    step, state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        step = state["step"]
    ddp_model = ray.train.torch.prepare_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    model.train()

    # 2. Data: this rank's shard, right-padded batches; skip what a restored run already trained on.
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(
        batch_size=train_cfg.batch_size, collate_fn=make_collate_fn(tokenizer.pad_token_id), drop_last=False
    )
    steps_per_epoch = config.get("steps_per_epoch")
    total_steps = train_cfg.max_steps or (steps_per_epoch * train_cfg.epochs if steps_per_epoch else None)

    # 3. Train.
    history: list[dict] = []
    window_loss = torch.zeros((), device=device)
    window_steps = window_sentences = window_tokens = 0
    rows_trained = 0
    t_window = time.perf_counter()
    resumed_from = step
    for batch_index, batch in enumerate(batches):
        if batch_index < resumed_from:
            continue
        if train_cfg.max_steps and step >= train_cfg.max_steps:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = ddp_model(batch["noisy_input_ids"], batch["noisy_attention_mask"], batch["target_ids"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
        optimizer.step()
        step += 1
        window_loss += loss.detach()
        window_steps += 1
        n = batch["target_ids"].shape[0]
        window_sentences += n
        rows_trained += n
        window_tokens += int((batch["target_ids"] != tokenizer.pad_token_id).sum())

        checkpoint_now = train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0
        if step % train_cfg.report_every == 0 or checkpoint_now:
            loss_sum, sentences, tokens = _sum_across_ranks(
                [window_loss.item(), window_sentences, window_tokens], device
            )
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"non-finite loss at step {step} (rank {rank})")
            seconds = time.perf_counter() - t_window
            metrics = {
                "step": step,
                "epoch": (step - 1) // steps_per_epoch if steps_per_epoch else 0,
                "loss": loss_sum / (window_steps * world),
                "lr": optimizer.param_groups[0]["lr"],
                "sentences_per_s": sentences / seconds,
                "tokens_per_s": tokens / seconds,
            }
            history.append(metrics)
            if rank == 0:
                progress = f"{step}/{total_steps}" if total_steps else f"{step}"
                print(f"[train] step {progress} loss {metrics['loss']:.4f} "
                      f"{metrics['sentences_per_s']:.1f} sentences/s {metrics['tokens_per_s']:.0f} tokens/s",
                      flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt_dir = None
                if checkpoint_now and rank == 0:
                    ckpt_dir = Path(tmp)
                    _save_state(ckpt_dir, model, optimizer, step)
                _report(metrics, ckpt_dir)
            window_loss.zero_()
            window_steps = window_sentences = window_tokens = 0
            t_window = time.perf_counter()

    # 4. Finish: prove the replicas are identical, then rank 0 writes the final checkpoint and export.
    digests = _all_gather(parameter_digest(model))
    rows_per_rank = _all_gather(rows_trained)
    summary = {
        "steps": step,
        "world_size": world,
        "rows_trained_per_rank": rows_per_rank,
        "replicas_identical": len(set(digests)) == 1,
        "parameter_digests": digests,
    }
    if rank == 0:
        print(f"[train] done: {step} steps, rows per rank {rows_per_rank}, "
              f"replicas identical: {summary['replicas_identical']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = None
        if rank == 0:
            ckpt_dir = Path(tmp)
            _save_state(ckpt_dir, model, optimizer, step)
            model.eval()
            export_encoder(model, tokenizer, ckpt_dir / "encoder", max_seq_length=config["max_length"])
            export_decoder(model, tokenizer, ckpt_dir / "decoder")
            (ckpt_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
            (ckpt_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _report({"step": step, "final": True, **{k: v for k, v in summary.items() if k != "parameter_digests"}},
                ckpt_dir)
