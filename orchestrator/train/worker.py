"""The per-worker training function that Ray Train's TorchTrainer runs on every rank.

Everything here runs inside a Train worker: the model is wrapped in DDP by `prepare_model` (gloo on
CPU, nccl on GPU), data comes from `ray.train.get_dataset_shard`, metrics and checkpoints go out
through `ray.train.report`, and rank 0 alone logs to MLflow (into the run the driver created).
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from vis4mer.datasets.pipeline import eval_videos, train_batches
from vis4mer.datasets.storage import filesystems
from vis4mer.datasets.tasks import TaskSpec, metric_mode
from vis4mer.datasets.windows import VideoAggregator
from vis4mer.model import ViS4mer, param_groups
from vis4mer.orchestrator.train.config import Config, config_yaml, from_dict, model_config
from vis4mer.orchestrator.train.inference import window_loss, window_outputs

STATE = "state.pt"


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config, task: TaskSpec):
    s = cfg.schedule
    if s.kind == "plateau":  # the released recipe, in the mode that fits the metric
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=metric_mode(task.metric), factor=s.factor,
                                                          patience=s.patience)
    if s.kind == "cosine":
        epochs, warm = cfg.train.epochs, s.warmup_epochs
        base = cfg.optim.lr

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            progress = (epoch - warm) / max(1, epochs - warm)
            floor = s.min_lr / base
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def loss_fn(out: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    if task.type == "classification":
        return F.cross_entropy(out.float(), y)
    return F.mse_loss(out[:, 0].float(), y.float())  # output[:, 0], as the released code


def diverged_is_worst(metrics: dict) -> dict:
    """A diverged (NaN) loss becomes +inf, the worst loss: Tune's schedulers compare with <, NaN
    compares false both ways, and ASHA would keep a diverged trial running. MLflow is sent no
    non-finite value either way."""
    for k, v in metrics.items():
        if k.endswith(("loss", "mse")) and isinstance(v, float) and math.isnan(v):
            metrics[k] = math.inf
    return metrics


MLFLOW_BATCH = 1000
FINAL_FLUSH_WAITS_S = (2, 4, 8, 16, 30)


class MlflowEpochLogger:
    """Rank 0's metric logger with an explicit run id. If the tracking server is unreachable,
    training goes on: the metrics are kept and sent with the next epoch's batch."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        # MLflow's own HTTP retries (7, doubling from 2 s) would stall training for minutes while
        # the server is down: retry briefly, then keep the metrics for the next epoch instead
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client, self.run_id, self.pending = MlflowClient(tracking_uri), run_id, []
        try:  # a restarted worker may redo an epoch it had logged before its last checkpoint: log it once
            self.logged = {m.step for m in self.client.get_metric_history(run_id, "epoch")}
        except Exception:  # noqa: BLE001 - tracking must never stop training
            self.logged = set()

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if step in self.logged:
            return
        self.logged.add(step)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))
                         and math.isfinite(float(v))]
        try:
            self._send()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._warn(f"warning: MLflow logging failed ({type(e).__name__}); {len(self.pending)} metrics kept "
                       "for the next epoch")

    def flush(self) -> bool:
        """At the end of training: sends what is still pending (the server was down through the last
        epochs), retrying for about a minute; True when nothing is left."""
        for wait in (0, *FINAL_FLUSH_WAITS_S):
            if not self.pending:
                return True
            time.sleep(wait)
            try:
                self._send()
            except Exception:  # noqa: BLE001, S110 - retried, then reported below
                pass
        if self.pending:
            self._warn(f"warning: MLflow unreachable at the end of training: {len(self.pending)} metrics were "
                       f"not logged (after {sum(FINAL_FLUSH_WAITS_S)} s of retries)")
        return not self.pending

    def _send(self) -> None:
        while self.pending:  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[:MLFLOW_BATCH])
            self.pending = self.pending[MLFLOW_BATCH:]

    @staticmethod
    def _warn(msg: str) -> None:
        warnings.warn(msg, stacklevel=2)
        print(msg, file=sys.stderr, flush=True)


def _all_reduce_mean(values: list[float], world: int) -> list[float]:
    if world == 1 or not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return (t / world).tolist()


def _gather(obj, world: int) -> list:
    if world == 1 or not torch.distributed.is_initialized():
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def evaluate(model, iterator, task: TaskSpec, batch_size: int, device, world: int, amp: bool, reader=None) -> dict:
    """Every evaluation window of every video of this rank's shard, aggregated per video, gathered
    over ranks. Each video goes to the device once; its windows are cut there (device_windows)."""
    agg, loss_sum, n = VideoAggregator(task), 0.0, 0
    model.eval()
    for video in eval_videos(iterator, task, reader):
        x = video["x"].pin_memory() if device.type == "cuda" else video["x"]
        out = window_outputs(model, x.to(device, non_blocking=True), task, batch_size, amp)
        loss_sum += window_loss(out, video["y"], task)
        n += len(out)
        agg.add([video["video_id"]] * len(out), out.cpu().numpy(), [video["y"]] * len(out))
    parts = _gather((agg, loss_sum, n), world)
    total = VideoAggregator(task)
    for a, _, _ in parts:
        total.merge(a)
    windows = sum(p[2] for p in parts)
    return {"loss": sum(p[1] for p in parts) / max(windows, 1), "metric": total.metric(), "videos": len(total.sums)}


def save_state(path: str, raw_model, opt, sched, epoch: int, best: float | None, cfg: Config) -> None:
    os.makedirs(path, exist_ok=True)
    torch.save({"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch, "best": best, "torch_rng": torch.get_rng_state()}, os.path.join(path, STATE))
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(config_yaml(cfg))


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    task = TaskSpec.from_dict(config["task"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    amp = cfg.train.bf16 and device.type == "cuda"

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    raw = ViS4mer(model_config(cfg.model, task))
    model = ray.train.torch.prepare_model(raw) if world > 1 or cfg.scaling.use_gpu else raw
    raw = model.module if hasattr(model, "module") else model
    # Training steps go through the compiled model (DDP wrapped first, as PyTorch recommends);
    # evaluation keeps the eager one: its batch sizes vary per video and would recompile.
    step_model = torch.compile(model) if cfg.train.compile else model
    # fused: one kernel for the whole parameter update on the GPU instead of a few per tensor
    opt = torch.optim.AdamW(param_groups(raw, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.ssm_lr),
                            fused=device.type == "cuda")
    sched = build_scheduler(opt, cfg, task)
    higher_is_better = metric_mode(task.metric) == "max"

    start, best = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best = state["epoch"] + 1, state["best"]
        torch.set_rng_state(state["torch_rng"])
    else:
        torch.manual_seed(cfg.train.seed + 1000 * rank)  # dropout masks differ per rank

    logger = MlflowEpochLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    best_res = filesystems(config["best_uri"], cfg.run.storage) if config.get("best_uri") else None
    train_it = ray.train.get_dataset_shard("train")
    eval_its = {s: ray.train.get_dataset_shard(s) for s in cfg.data.eval_splits}
    micro = cfg.data.batch_size // (world * cfg.optim.grad_accum)

    for epoch in range(start, cfg.train.epochs):
        if cfg.train.fail_at_epoch == epoch:  # fault injection (reliability tests): a trial that raises
            raise RuntimeError(f"fault injected by train.fail_at_epoch={epoch}")
        model.train()
        t0 = time.perf_counter()
        wait, steps, loss_sum, correct, clips = 0.0, 0, 0.0, 0, 0
        t_wait = time.perf_counter()
        for i, batch in enumerate(train_batches(train_it, task, micro, seed=cfg.train.seed, epoch=epoch,
                                                pin_memory=device.type == "cuda", reader=config["reader"],
                                                shuffle=cfg.data.shuffle_files,
                                                shuffle_buffer=cfg.data.shuffle_buffer)):
            wait += time.perf_counter() - t_wait
            # float16 until on the device (an asynchronous copy from pinned memory), cast there
            x = batch["x"].to(device, non_blocking=True).float()
            y = batch["y"].to(device, non_blocking=True)
            last_micro = (i + 1) % cfg.optim.grad_accum == 0
            # no gradient all-reduce on the micro-steps before the last one of an optimiser step
            sync = model.no_sync() if (not last_micro and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = step_model(x)
                loss = loss_fn(out, y, task)
                (loss / cfg.optim.grad_accum).backward()
            if last_micro:
                if cfg.optim.clip_norm:
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.clip_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
            loss_sum += loss.item() * len(y)
            clips += len(y)
            if task.type == "classification":
                correct += (out.argmax(-1) == y).sum().item()
            t_wait = time.perf_counter()
        elapsed = time.perf_counter() - t0
        train_loss, train_acc, total_clips, wait_frac = _all_reduce_mean(
            [loss_sum / max(clips, 1), correct / max(clips, 1), clips * world, wait / max(elapsed, 1e-9)], world)
        metrics = {"epoch": epoch, "train_loss": train_loss, "lr": opt.param_groups[0]["lr"], "epoch_time_s": elapsed,
                   "clips_per_s": total_clips / elapsed, "tokens_per_s": total_clips * task.seq_len / elapsed,
                   "data_wait_frac": wait_frac, "peak_mem_gb": _peak_memory_gb(device), "steps": steps}
        if task.type == "classification":
            metrics["train_acc"] = train_acc

        improved = False
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            for split, it in eval_its.items():
                r = evaluate(raw, it, task, cfg.data.eval_batch_size, device, world, amp, config["reader"])
                metrics[f"{split}_loss"] = r["loss"]
                metrics[f"{split}_{task.metric}"] = r["metric"]
            key = f"{cfg.data.eval_splits[0]}_{task.metric}"
            if key in metrics:
                m = metrics[key]
                improved = best is None or (m > best if higher_is_better else m < best)
                best = m if improved else best
                metrics[f"best_{key}"] = best
                if cfg.schedule.kind == "plateau" and (epoch + 1) % cfg.schedule.interval == 0:
                    sched.step(m)
        if cfg.schedule.kind != "plateau":
            sched.step()

        diverged_is_worst(metrics)
        if logger:
            metrics["tracking_backlog"] = len(logger.pending)  # > 0: the tracking server was unreachable
            logger.log(metrics, step=epoch)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                if improved and best_res is not None:
                    save_state(d + "/best", raw, opt, sched, epoch, best, cfg)
                    _upload(d + "/best", best_res)
                if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
                    save_state(d + "/ckpt", raw, opt, sched, epoch, best, cfg)
                    ckpt = ray.train.Checkpoint.from_directory(d + "/ckpt")
            ray.train.report(metrics, checkpoint=ckpt)
    if logger:
        logger.flush()


def _upload(local_dir: str, res) -> None:
    """Copy the best state to its fixed place in the run's storage (local or object store)."""
    if res.scheme == "file":
        os.makedirs(res.path, exist_ok=True)
    for name in os.listdir(local_dir):
        with open(os.path.join(local_dir, name), "rb") as src, res.pa.open_output_stream(res.join(name)) as dst:
            dst.write(src.read())
