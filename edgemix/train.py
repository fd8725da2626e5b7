"""FP32 training and the fine-tuning loop QAT reuses; single process or torchrun DDP.

Under ``torchrun`` (WORLD_SIZE > 1) the process group is gloo on CPU and NCCL on CUDA; every
rank sees the same seeded permutation of the data and takes its own stride of it, and only
rank 0 writes checkpoints and prints.
"""

from __future__ import annotations

import copy
import math
import os
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgemix import console
from edgemix.config import BuildConfig
from edgemix.data import ImageSet, to_model_input
from edgemix.errors import UsageError, unknown_choice


DISTILL_LOSSES = typing.get_args(BuildConfig.model_fields["qat_loss"].annotation)  # ("kl", "mse")


@dataclass
class TrainConfig:
    epochs: float = 12.0  # fractional epochs allowed (QAT fine-tuning often needs less than one)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    augment: bool = True  # random 2-pixel shifts and horizontal flips
    seed: int = 0
    threads: int | None = None
    # knowledge distillation towards a teacher's logits (QAT: the FP32 reference): the loss is
    # distill * T^2 * KL(teacher/T || student/T) + (1 - distill) * cross-entropy on the labels
    distill: float = 0.0
    temperature: float = 1.0
    # the distillation term: "kl" (soft targets at the temperature) or "mse" (the logits themselves,
    # which holds the student's margins, and so its top-1, closest to the teacher's)
    distill_loss: str = "kl"

    def validate(self) -> None:
        if not self.epochs > 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
                             hint="0 trains on the labels as they are; 0.1 is the usual smoothing")
        if not self.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.warmup_epochs >= 0:
            raise UsageError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.distill <= 1:
            raise UsageError(f"the distillation weight must be in [0, 1], got {self.distill}",
                             hint="1 learns the FP32 model's outputs only, 0 the labels only")
        if not self.temperature > 0:
            raise UsageError(f"the distillation temperature must be > 0, got {self.temperature}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise unknown_choice("distillation loss", self.distill_loss, DISTILL_LOSSES)


def qat_config(epochs: float, seed: int = 0) -> TrainConfig:
    """QAT fine-tuning settings, the defaults of ``edgemix build --qat-epochs`` (read from
    :class:`BuildConfig`: lr 3e-5, batch 64, the FP32 logits distilled by MSE) and of the backends
    when a caller gives none; no warm-up, augmentation, label smoothing or weight decay, which would
    pull a converged model away from the FP32 optimum it is meant to stay near (docs/qat.md has the
    sweep behind these)."""
    default = {name: field.default for name, field in BuildConfig.model_fields.items()}
    return TrainConfig(epochs=epochs, batch_size=default["qat_batch_size"], lr=default["qat_lr"], weight_decay=0.0,
                       warmup_epochs=0.0, label_smoothing=0.0, augment=False, seed=seed,
                       distill=default["qat_distill"], distill_loss=default["qat_loss"])


def loss_name(cfg: TrainConfig) -> str:
    """The training loss in words (for reports)."""
    if cfg.distill == 0:
        return "cross-entropy on the labels"
    how = f"temperature {cfg.temperature:g}" if cfg.distill_loss == "kl" else "mean squared error on the logits"
    kd = f"distillation towards the FP32 model's logits ({how})"
    return kd if cfg.distill == 1 else f"{cfg.distill:g} x {kd} + {1 - cfg.distill:g} x cross-entropy on the labels"


def training_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                  teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the labels, blended with distillation towards ``teacher_logits`` (cfg.distill)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing) if cfg.distill < 1 else 0.0
    if teacher_logits is None or cfg.distill == 0:
        return ce
    if cfg.distill_loss == "mse":
        kd = F.mse_loss(logits, teacher_logits)
    else:
        t = cfg.temperature
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                      log_target=True, reduction="batchmean") * t * t
    return cfg.distill * kd + (1 - cfg.distill) * ce


RUN_FILES = ("last.pt", "model.pt")  # what a training run writes into its --out folder


def check_run_folder(out: Path) -> None:
    """Before training starts: --out may be a new folder or one whose last.pt/model.pt edgemix wrote;
    other files in it are left alone, and a file edgemix did not write is never replaced."""
    from edgemix.fileutil import refuse_foreign_file, user_path
    from edgemix.models.checkpoints import FORMAT

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder", hint="choose another --out (a folder)")

    def is_ours(path: Path) -> bool:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch raises many types for files that are not its own
            return False
        return isinstance(obj, dict) and obj.get("format") == FORMAT

    for name in RUN_FILES:
        refuse_foreign_file(out / name, is_ours, "a checkpoint", "--out")
    with user_path(out, "create the training folder", "--out"):
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".edgemix-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts of up to ``pad`` pixels (zero padding in normalised space) and flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm affines."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_top1(model, data: ImageSet, spec, batch_size: int = 500, device: str = "cpu") -> float:
    correct = 0
    for i in range(0, len(data), batch_size):
        x = to_model_input(data.images[i:i + batch_size], spec).to(device)
        correct += (model(x).argmax(1).cpu() == data.labels[i:i + batch_size]).sum().item()
    return correct / max(1, len(data))


def fit(model, params, spec, data: ImageSet, cfg: TrainConfig, *, device: str = "cpu",
        start_step: int = 0, optimizer=None, on_epoch_end=None, set_train=None, desc: str = "train",
        teacher=None):
    """The training loop shared by FP32 training and QAT fine-tuning.

    ``model`` may be an nn.Module or an exported QAT GraphModule; ``set_train(flag)`` switches its
    mode (exported graphs need torchao's move_exported_model_to_train/eval, not ``.train()``).
    ``on_epoch_end(epoch, step, optimizer, loss)`` runs after each whole epoch (checkpoints, eval).
    ``teacher``: the model whose logits the loss distills when cfg.distill > 0 (run in eval mode on
    ``device``: a copy is moved there, the caller's model stays where it is); unused otherwise.
    Returns the optimizer and the last step.
    """
    cfg.validate()
    if cfg.distill > 0:
        if teacher is None:
            raise ValueError("cfg.distill > 0 needs a teacher model")
        teacher = (teacher if device == "cpu" else copy.deepcopy(teacher).to(device)).eval()
    else:
        teacher = None
    rank, world = dist_info()
    n = len(data)
    per_rank = n // world
    steps_per_epoch = max(1, per_rank // cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    warmup = min(total_steps // 2, round(cfg.warmup_epochs * steps_per_epoch))
    if optimizer is None:
        optimizer = make_optimizer(params, cfg)
    (set_train or (lambda flag: model.train(flag)))(True)
    step = start_step
    loss_avg = float("nan")
    with console.progress(desc, total_steps - start_step) as advance:
        while step < total_steps:
            epoch = step // steps_per_epoch
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            order = torch.randperm(n, generator=g)[rank * per_rank:(rank + 1) * per_rank]
            aug_g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + rank)
            first = step - epoch * steps_per_epoch
            for b in range(first, steps_per_epoch):
                if step >= total_steps:
                    break
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                x = to_model_input(data.images[idx], spec)
                if cfg.augment:
                    x = augment_batch(x, aug_g)
                x, y = x.to(device), data.labels[idx].to(device)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, warmup, cfg.lr)
                with torch.no_grad():
                    t_logits = teacher(x) if teacher is not None else None
                loss = training_loss(model(x), y, cfg, t_logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_avg = loss.item() if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * loss.item()
                step += 1
                advance(1, loss=f"{loss_avg:.3f}")
            if on_epoch_end is not None and (step % steps_per_epoch == 0 or step >= total_steps):
                (set_train or (lambda flag: model.train(flag)))(False)
                on_epoch_end(epoch, step, optimizer, loss_avg)
                (set_train or (lambda flag: model.train(flag)))(True)
    (set_train or (lambda flag: model.train(flag)))(False)
    return optimizer, step


def train(model, spec, train_set: ImageSet, eval_set: ImageSet | None, cfg: TrainConfig, out_dir: Path,
          resume: Path | None = None, source_meta: dict | None = None) -> dict:
    """FP32 training with per-epoch checkpoints (``last.pt``, resumable) and a final ``model.pt``."""
    from edgemix.models.checkpoints import read_edgemix_checkpoint, save_checkpoint

    rank, world = dist_info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model.to(device)
    start_step, history = 0, []
    if resume is not None:
        state = read_edgemix_checkpoint(resume)
        if "optimizer" not in state:
            raise UsageError(f"{resume} holds no training state to resume from",
                             hint="resume from the run's last.pt, not its model.pt")
        model.load_state_dict(state["state_dict"])
        start_step, history = state["step"], state["meta"].get("history", [])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if device == "cpu" else [device])
    params = list(model.parameters())
    optimizer = make_optimizer(params, cfg)
    if resume is not None:
        optimizer.load_state_dict(state["optimizer"])
    t0 = time.perf_counter()
    prior_seconds = history[-1]["wall_s"] if history else 0.0

    def meta(step):
        return {"train_config": asdict(cfg), "data": source_meta or {}, "step": step,
                "history": history, "device": device, "world_size": world,
                "torch": str(torch.__version__)}

    def on_epoch_end(epoch, step, opt, loss):
        top1 = evaluate_top1(model, eval_set, spec, device=device) if (eval_set is not None and rank == 0) else None
        history.append({"epoch": epoch + 1, "step": step, "loss": round(loss, 4),
                        "eval_top1": top1, "wall_s": round(prior_seconds + time.perf_counter() - t0, 1)})
        if rank == 0:
            save_checkpoint(out_dir / "last.pt", model, meta(step),
                            extra={"optimizer": opt.state_dict(), "step": step})
            acc = f"  eval top-1 {100 * top1:.2f}%" if top1 is not None else ""
            console.info(f"epoch {epoch + 1}: loss {loss:.4f}{acc}  ({history[-1]['wall_s']:.0f} s)")

    fit(net, params, spec, train_set, cfg, device=device, start_step=start_step, optimizer=optimizer,
        on_epoch_end=on_epoch_end, set_train=lambda flag: net.train(flag), desc="train")
    result = {"history": history, "final_top1": history[-1]["eval_top1"] if history else None,
              "wall_s": history[-1]["wall_s"] if history else 0.0, "device": device}
    if rank == 0:
        save_checkpoint(out_dir / "model.pt", model.cpu(), meta(history[-1]["step"] if history else 0))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result
