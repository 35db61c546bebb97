"""Train a face classifier on HW2P2-layout data: a backbone plus a softmax or margin head.

The HW2P2 recipe in one script: a backbone from ``examples/backbones`` maps images to
embeddings, a head (``--head``) classifies them. Two ways to reach discriminative
embeddings for verification, both from the HW2P2 material:

- joint training: a margin head (ArcFace, CosFace, ...) from the start, optionally with
  center loss added (``--center-loss-weight``);
- sequential fine-tuning: train with ``--head softmax``, then swap in a margin head for
  ``--finetune-epochs`` more epochs (``--finetune-head arcface``). The margin head starts
  from the softmax class weights. To fine-tune a finished run, pass its checkpoint with
  ``--init runs/softmax/last.pt --epochs 0``.

A pair or embedding loss from ``marginloss.losses`` (``--loss triplet``, ``contrastive``,
``multi_similarity``, ...) trains the embeddings for direct comparison, as the HW2P2
write-up's section 6.4 recommends for verification with unseen identities. Batches then
come from ``marginloss.samplers.ClassBalancedBatchSampler`` (``--samples-per-class`` K
images of ``batch-size / K`` identities). By default it is added to the head's loss with
``--loss-weight`` (the write-up's "approach 1", joint optimisation); with ``--loss-only``
the backbone learns from the pair loss alone and the head is trained on detached
embeddings, as a linear probe that keeps the dev accuracy meaningful.

Each stage uses AdamW (or SGD) with a linear warmup and cosine decay, label smoothing, and
optionally mixed precision (``--amp bf16`` on CPU or CUDA, ``--amp fp16`` on CUDA with a
gradient scaler). After every epoch the script evaluates dev classification accuracy and
writes ``<out>/last.pt`` (resume with ``--resume``), ``<out>/metrics.csv`` and
``<out>/curves.png``.

Example::

    python examples/face/train.py --data data/toy_faces --out runs/arcface \\
        --backbone resnet_toy --head arcface --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `backbones` and `face` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones import available, build, count_parameters
from face.data import (
    DataLayoutError,
    channel_stats,
    check_layout,
    classification_dir,
    eval_transform,
    identity_difference,
    image_folder,
    train_transform,
)
from face.model import (
    HEADS,
    CheckpointError,
    center_loss_input,
    copy_class_weights,
    head_kwargs,
    load_checkpoint,
    make_head,
    save_checkpoint,
)

PAIR_LOSSES = ("triplet", "contrastive", "multi_similarity", "lifted_structure", "npair", "quadruplet",
               "marginal", "soft_triple")

METRIC_COLUMNS = ("epoch", "stage", "head", "lr", "train_loss", "train_acc", "dev_loss", "dev_acc", "epoch_time_s")


@dataclass
class Stage:
    """A run is one or two stages: training with ``--head``, then fine-tuning with ``--finetune-head``."""

    name: str
    head: str
    epochs: int
    lr: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Outputs under --out: last.pt (checkpoint, every epoch), metrics.csv, curves.png, "
        "channel_stats.json. Errors in the data layout or checkpoint print 'error: ...' and exit with 2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", type=Path, required=True, help="dataset root in the HW2P2 layout (see make_toy_faces.py)")
    io.add_argument("--out", type=Path, required=True, help="run folder for checkpoint, metrics and plot")
    io.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (same backbone and heads; --epochs may grow)")
    io.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="end this invocation after N epochs (the schedule still plans all of them); continue with --resume")
    io.add_argument("--init", type=Path, default=None, help="start the backbone (and the head, if of the same kind) from this checkpoint")
    io.add_argument("--image-size", type=int, default=None, help="training resolution (default: the size of the first train image)")
    io.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    io.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    io.add_argument("--no-plot", action="store_true", help="do not write curves.png")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet_toy", choices=available(), help="backbone configuration (examples/backbones)")
    model.add_argument("--embedding-dim", type=int, default=128, help="embedding size")
    model.add_argument("--dropout", type=float, default=0.0, help="dropout before the embedding projection")
    model.add_argument("--head", default="softmax", choices=HEADS, help="classification head of the first stage")
    model.add_argument("--scale", type=float, default=None, help="logit scale s of the cosine heads (default: per head, see model.py)")
    model.add_argument("--margin", type=float, default=None, help="margin m of arcface (radians), cosface, sphereface/lsoftmax (integer)")
    model.add_argument("--combined-margins", type=float, nargs=3, metavar=("M1", "M2", "M3"), default=None,
                       help="margins of --head combined: cos(m1*theta + m2) - m3")
    model.add_argument("--center-loss-weight", type=float, default=0.0, help="add this times marginloss.CenterLoss (0: off)")
    model.add_argument("--center-loss-alpha", type=float, default=None, help="CenterLoss alpha (None: centres learned by the optimiser)")
    model.add_argument("--loss", default="none", choices=("none", *PAIR_LOSSES),
                       help="pair/embedding loss from marginloss.losses, with class-balanced P x K batches")
    model.add_argument("--loss-weight", type=float, default=1.0, help="weight of --loss added to the head's loss")
    model.add_argument("--loss-only", action="store_true",
                       help="train the backbone with --loss alone (the head learns on detached embeddings)")
    model.add_argument("--samples-per-class", type=int, default=4, help="K of the P x K batches used with --loss")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10, help="epochs of the first stage (0 with --init: fine-tune only)")
    optim.add_argument("--batch-size", type=int, default=64, help="batch size")
    optim.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="optimiser")
    optim.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the first stage")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (not on norms and biases)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup length of each stage, in epochs")
    optim.add_argument("--min-lr-ratio", type=float, default=0.01, help="cosine schedule floor as a fraction of the peak lr")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy")
    optim.add_argument("--finetune-head", default=None, choices=HEADS, help="second stage: swap in this head")
    optim.add_argument("--finetune-epochs", type=int, default=0, help="epochs of the second stage")
    optim.add_argument("--finetune-lr", type=float, default=None, help="peak lr of the second stage (default: --lr / 4)")
    optim.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut every epoch after this many batches")
    optim.add_argument("--margin-warmup", type=int, default=0, metavar="N",
                       help="ramp the head's margin linearly from 0 over the first N steps of each stage "
                       "(marginloss.MarginWarmup; 0: off)")

    run = parser.add_argument_group("execution")
    run.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (0: torch's default); 1 is often fastest for small models on a busy machine")
    run.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="mixed precision (fp16 needs CUDA)")
    run.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, initialisation)")
    run.add_argument("--smoke", action="store_true", help="tiny run for CI: 1 epoch (+1 fine-tune epoch if asked) of 2 batches")
    return parser


class PairLoss(nn.Module):
    """The ``--loss`` criterion on a batch's embeddings (multi-similarity with its miner)."""

    def __init__(self, name: str, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        import marginloss
        from marginloss.miners import multi_similarity_miner, pairwise_distance

        self.name = name
        self._miner = multi_similarity_miner
        self._distance = pairwise_distance
        criteria: dict[str, Any] = {
            "triplet": lambda: marginloss.TripletLoss(),
            "contrastive": lambda: marginloss.ContrastiveLoss(),
            "multi_similarity": lambda: marginloss.MultiSimilarityLoss(),
            "lifted_structure": lambda: marginloss.LiftedStructureLoss(),
            "npair": lambda: marginloss.NPairLoss(),
            "quadruplet": lambda: marginloss.QuadrupletLoss(),
            "marginal": lambda: marginloss.MarginalLoss(),
            "soft_triple": lambda: marginloss.SoftTripleLoss(embedding_dim, num_classes),
        }
        self.criterion = criteria[name]()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.name == "multi_similarity":  # the paper's mining, then its weighting
            similarity = 1 - self._distance(embeddings.detach(), "cosine")
            return self.criterion(embeddings, labels, self._miner(similarity, labels))
        return self.criterion(embeddings, labels)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return device


def autocast_context(device: torch.device, amp: str) -> Any:
    """``torch.autocast`` for the backbone, or a no-op when mixed precision is off."""
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def stages_from_args(args: argparse.Namespace) -> list[Stage]:
    stages = [Stage("train", args.head, args.epochs, args.lr)]
    if args.finetune_head is not None and args.finetune_epochs > 0:
        stages.append(Stage("finetune", args.finetune_head, args.finetune_epochs, args.finetune_lr or args.lr / 4))
    return stages


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and kernels; leave norms, biases and layer scales (1-d tensors) alone."""
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(args: argparse.Namespace, modules: Sequence[nn.Module], lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(modules, args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


# The float margins --margin-warmup ramps, per head (SphereFace's and L-Softmax's integer
# margins have their own lambda annealing).
WARMUP_ATTRIBUTES = {"arcface": ("margin",), "cosface": ("margin",), "combined": ("m2", "m3"),
                     "uniface": ("margin",), "sphereface2": ("margin",)}


def margin_warmups(head: nn.Module, head_name: str, steps: int) -> list[Any]:
    """``marginloss.MarginWarmup`` schedules for ``--margin-warmup N`` (none for N = 0)."""
    if steps <= 0:
        return []
    if head_name not in WARMUP_ATTRIBUTES:
        raise ValueError(f"--margin-warmup needs a head with a float margin ({', '.join(WARMUP_ATTRIBUTES)}), "
                         f"got --head {head_name}")
    import marginloss

    return [marginloss.MarginWarmup(head, steps=steps, attribute=name) for name in WARMUP_ATTRIBUTES[head_name]]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Any:
    """LR multiplier per step: linear warmup to 1, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def write_metrics(history: list[dict[str, Any]], out: Path) -> None:
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_axis.plot(epochs, [row["dev_loss"] for row in history], marker="o", label="dev")
    loss_axis.set(xlabel="epoch", ylabel="loss (of the epoch's head)", title="loss")
    acc_axis.plot(epochs, [row["train_acc"] for row in history], marker="o", label="train")
    acc_axis.plot(epochs, [row["dev_acc"] for row in history], marker="o", label="dev")
    acc_axis.set(xlabel="epoch", ylabel="accuracy", title="classification accuracy", ylim=(0, 1.02))
    for row, previous in zip(history[1:], history):
        if row["stage"] != previous["stage"]:
            for axis in (loss_axis, acc_axis):
                axis.axvline(previous["epoch"] + 0.5, color="grey", linestyle="--", linewidth=1)
    for axis in (loss_axis, acc_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train_one_epoch(
    backbone: nn.Module, head: nn.Module, center_loss: nn.Module | None, loader: DataLoader, steps: int,
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
    device: torch.device, args: argparse.Namespace, desc: str, head_name: str, pair_loss: nn.Module | None = None,
    warmups: Sequence[Any] = (),
) -> tuple[float, float]:
    """One pass over at most ``steps`` batches; returns the mean loss and the training accuracy."""
    backbone.train()
    head.train()
    total_loss, correct, count = 0.0, 0, 0
    bar = tqdm(loader, total=steps, desc=desc, disable=args.no_progress or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        if step >= steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_context(device, args.amp):
            embeddings = backbone(images)
        # Heads run in float32: margins on cosines near 1 lose their meaning in 16 bits.
        embeddings = embeddings.float()
        if pair_loss is not None and args.loss_only:
            loss = head(embeddings.detach(), labels) + pair_loss(center_loss_input(head_name, embeddings), labels)
        elif pair_loss is not None:
            loss = head(embeddings, labels) + args.loss_weight * pair_loss(center_loss_input(head_name, embeddings), labels)
        else:
            loss = head(embeddings, labels)
        if center_loss is not None:
            loss = loss + args.center_loss_weight * center_loss(center_loss_input(head_name, embeddings), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for warmup in warmups:
            warmup.step()
        with torch.no_grad():
            correct += int((head.logits(embeddings).argmax(1) == labels).sum())
        total_loss += float(loss.detach()) * labels.numel()
        count += labels.numel()
        bar.set_postfix(loss=f"{total_loss / count:.3f}", acc=f"{correct / count:.3f}")
    bar.close()
    return total_loss / count, correct / count


@torch.no_grad()
def evaluate(backbone: nn.Module, head: nn.Module, loader: DataLoader, device: torch.device, amp: str) -> tuple[float, float]:
    """Dev loss (with the head's margin) and accuracy (argmax of the margin-free logits)."""
    backbone.eval()
    head.eval()
    total_loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast_context(device, amp):
            embeddings = backbone(images)
        embeddings = embeddings.float()
        total_loss += float(head(embeddings, labels)) * labels.numel()
        correct += int((head.logits(embeddings).argmax(1) == labels).sum())
        count += labels.numel()
    return total_loss / count, correct / count


def _rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "loader": loader_generator.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stages described by ``args``; return the final metrics and the checkpoint path."""
    if args.smoke:
        args.epochs = min(args.epochs, 1)
        args.finetune_epochs = min(args.finetune_epochs, 1)
        args.max_steps_per_epoch = 2
    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    stages = stages_from_args(args)
    if sum(stage.epochs for stage in stages) == 0:
        raise ValueError("nothing to train: --epochs and --finetune-epochs are both 0")
    if args.resume and args.init is not None:
        raise ValueError("--resume and --init exclude each other (--resume continues <out>/last.pt)")
    seed_everything(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "last.pt"
    resume_state = load_checkpoint(checkpoint_path) if args.resume else None
    init_state = load_checkpoint(args.init) if args.init is not None else None

    check_layout(args.data)  # verification folders too: verify.py needs them after training
    train_dir, dev_dir = classification_dir(args.data, "train"), classification_dir(args.data, "dev")
    probe = image_folder(train_dir)
    image_size = args.image_size or probe[0][0].size[0]
    if resume_state is not None:
        mean, std = resume_state["mean"], resume_state["std"]
    else:
        mean, std = channel_stats(train_dir, cache=out / "channel_stats.json", image_size=image_size)
    train_set = image_folder(train_dir, train_transform(image_size, mean, std))
    dev_set = image_folder(dev_dir, eval_transform(image_size, mean, std))
    if dev_set.classes != train_set.classes:
        raise DataLayoutError(f"{dev_dir} and {train_dir} hold different identity folders "
                              f"(dev against train: {identity_difference(dev_set.classes, train_set.classes)})")
    classes = train_set.classes
    for state, flag in ((resume_state, "--resume"), (init_state, "--init")):
        if state is not None and state["classes"] != classes:
            raise CheckpointError(f"{flag} checkpoint was trained on other identities than {train_dir}")
        if state is not None and (state["backbone"], state["embedding_dim"]) != (args.backbone, args.embedding_dim):
            raise CheckpointError(
                f"{flag} checkpoint holds backbone {state['backbone']} with embedding_dim {state['embedding_dim']}, "
                f"not {args.backbone} with {args.embedding_dim}"
            )

    loader_generator = torch.Generator().manual_seed(args.seed)
    pin = device.type == "cuda"
    # drop_last: a last batch of one sample would break the embedding's BatchNorm1d.
    pair_sampler = None
    if args.loss != "none":
        from marginloss.samplers import ClassBalancedBatchSampler

        if args.samples_per_class < 2 or args.batch_size < 2 * args.samples_per_class:
            raise ValueError(f"--loss needs --samples-per-class >= 2 and --batch-size >= 2 * it, got "
                             f"{args.samples_per_class} and {args.batch_size}")
        # replacement: identities with fewer than K training images are still drawn
        pair_sampler = ClassBalancedBatchSampler(
            list(train_set.targets), args.batch_size // args.samples_per_class, args.samples_per_class,
            replacement=True, num_batches=max(1, len(train_set) // args.batch_size), seed=args.seed,
        )
        train_loader = DataLoader(train_set, batch_sampler=pair_sampler, num_workers=args.workers,
                                  persistent_workers=args.workers > 0, pin_memory=pin)
    else:
        train_loader = DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, generator=loader_generator,
            drop_last=len(train_set) > args.batch_size, persistent_workers=args.workers > 0, pin_memory=pin,
        )
    dev_loader = DataLoader(dev_set, batch_size=2 * args.batch_size, num_workers=args.workers, pin_memory=pin)
    steps_per_epoch = len(train_loader) if args.max_steps_per_epoch is None else min(len(train_loader), args.max_steps_per_epoch)

    backbone = build(args.backbone, args.embedding_dim, dropout=args.dropout).to(device)
    backbone_params = count_parameters(backbone)
    print(f"backbone {args.backbone}: {backbone_params:,} parameters; {len(classes)} classes, "
          f"{len(train_set)} train / {len(dev_set)} dev images at {image_size} px; device {device}")
    center_loss: nn.Module | None = None
    if args.center_loss_weight > 0:
        import marginloss

        center_loss = marginloss.CenterLoss(args.embedding_dim, len(classes), alpha=args.center_loss_alpha).to(device)

    pair_loss: nn.Module | None = None
    if args.loss != "none":
        pair_loss = PairLoss(args.loss, args.embedding_dim, len(classes)).to(device)

    def new_head(name: str) -> nn.Module:
        kwargs = head_kwargs(name, scale=args.scale, margin=args.margin, combined_margins=args.combined_margins)
        return make_head(name, args.embedding_dim, len(classes), kwargs, args.label_smoothing).to(device)

    history: list[dict[str, Any]] = []
    stage_index, stage_epoch = 0, 0
    head = new_head(stages[0].head)
    if init_state is not None:
        backbone.load_state_dict(init_state["model"])
        if init_state["head"] == stages[0].head:
            head.load_state_dict(init_state["head_state"])
        else:
            copy_class_weights(make_and_load(init_state, args, len(classes), device), head)
        print(f"initialised from {args.init} ({init_state['head']} head)")
    if resume_state is not None:
        stage_index, stage_epoch = resume_state["stage"], resume_state["stage_epoch"]
        if stage_index >= len(stages) or stages[stage_index].head != resume_state["head"]:
            raise CheckpointError(
                f"--resume: {checkpoint_path} is in stage {resume_state['stage']} with head {resume_state['head']}, "
                f"but this command's stages are {[(stage.name, stage.head) for stage in stages]}"
            )
        backbone.load_state_dict(resume_state["model"])
        head = new_head(resume_state["head"])
        head.load_state_dict(resume_state["head_state"])
        if center_loss is not None and resume_state.get("center_state") is not None:
            center_loss.load_state_dict(resume_state["center_state"])
        if pair_loss is not None and resume_state.get("pair_state") is not None:
            pair_loss.load_state_dict(resume_state["pair_state"])
        history = list(resume_state["history"])
        # Restored last, after every random initialisation above, so the continued run draws
        # the same augmentations and batch order as an uninterrupted one.
        _set_rng_state(resume_state["rng"], loader_generator)
        print(f"resuming {checkpoint_path}: stage {stages[stage_index].name}, {stage_epoch} epoch(s) done")

    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    global_epoch = len(history)
    epochs_this_run = 0
    result: dict[str, Any] = {"backbone_params": backbone_params, "checkpoint": checkpoint_path, "history": history}
    while stage_index < len(stages):
        stage = stages[stage_index]
        if stage_epoch >= stage.epochs:
            stage_index, stage_epoch = stage_index + 1, 0
            if stage_index < len(stages):
                previous, head = head, new_head(stages[stage_index].head)
                if copy_class_weights(previous, head):
                    print(f"fine-tuning: {stages[stage_index].head} head starts from the {stage.head} class weights")
            continue
        modules = [backbone, head] + [m for m in (center_loss, pair_loss) if m is not None]
        optimizer = make_optimizer(args, modules, stage.lr)
        warmups = margin_warmups(head, stage.head, args.margin_warmup)
        total_steps = stage.epochs * steps_per_epoch
        warmup_steps = min(total_steps, max(1, round(args.warmup_epochs * steps_per_epoch)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, args.min_lr_ratio))
        if resume_state is not None and resume_state["stage"] == stage_index and stage_epoch == resume_state["stage_epoch"]:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            scaler.load_state_dict(resume_state["scaler"])
            for warmup, warmup_state in zip(warmups, resume_state.get("warmup_state") or ()):
                warmup.load_state_dict(warmup_state)
        while stage_epoch < stage.epochs:
            if args.stop_after is not None and epochs_this_run >= args.stop_after:
                print(f"stopping after {epochs_this_run} epoch(s) as asked; continue with --resume", flush=True)
                stage_index = len(stages)
                break
            start = time.perf_counter()
            if pair_sampler is not None:
                pair_sampler.set_epoch(global_epoch)  # seeded per epoch: a resumed run draws the same batches
            train_loss, train_acc = train_one_epoch(
                backbone, head, center_loss, train_loader, steps_per_epoch, optimizer, scheduler, scaler, device, args,
                desc=f"epoch {global_epoch + 1} [{stage.head}]", head_name=stage.head, pair_loss=pair_loss,
                warmups=warmups,
            )
            dev_loss, dev_acc = evaluate(backbone, head, dev_loader, device, args.amp)
            stage_epoch += 1
            global_epoch += 1
            epochs_this_run += 1
            row = {
                "epoch": global_epoch, "stage": stage.name, "head": stage.head,
                "lr": f"{optimizer.param_groups[0]['lr']:.3g}",
                "train_loss": round(train_loss, 5), "train_acc": round(train_acc, 5),
                "dev_loss": round(dev_loss, 5), "dev_acc": round(dev_acc, 5),
                "epoch_time_s": round(time.perf_counter() - start, 2),
            }
            history.append(row)
            print(f"epoch {global_epoch:3d} {stage.name:<8} {stage.head:<10} loss {row['train_loss']:.4f} "
                  f"train acc {row['train_acc']:.3f} dev acc {dev_acc:.3f} ({row['epoch_time_s']:.1f} s)", flush=True)
            save_checkpoint({
                "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
                "backbone": args.backbone, "embedding_dim": args.embedding_dim, "dropout": args.dropout,
                "image_size": image_size, "classes": classes, "mean": list(mean), "std": list(std),
                "head": stage.head, "head_kwargs": head_kwargs(stage.head, scale=args.scale, margin=args.margin,
                                                               combined_margins=args.combined_margins),
                "label_smoothing": args.label_smoothing,
                "model": backbone.state_dict(), "head_state": head.state_dict(),
                "center_state": center_loss.state_dict() if center_loss is not None else None,
                "pair_state": pair_loss.state_dict() if pair_loss is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "warmup_state": [warmup.state_dict() for warmup in warmups],
                "stage": stage_index, "stage_epoch": stage_epoch, "history": history, "rng": _rng_state(loader_generator),
            }, checkpoint_path)
            write_metrics(history, out)
            if not args.no_plot:
                plot_curves(history, out / "curves.png")
    if history:
        result["dev_acc"] = history[-1]["dev_acc"]
        result["num_classes"] = len(classes)
    return result


def make_and_load(state: dict[str, Any], args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    """The head stored in checkpoint ``state``, with its weights."""
    head = make_head(state["head"], args.embedding_dim, num_classes, state["head_kwargs"], state["label_smoothing"]).to(device)
    head.load_state_dict(state["head_state"])
    return head


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        train(args)
    except (DataLayoutError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
