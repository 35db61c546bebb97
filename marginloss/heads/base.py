r"""The public base of every classification head, and the registry of heads by name.

A head is defined by its margin.  :class:`MarginHead` holds the class weight
``[num_classes, embedding_dim]`` (the layout of :class:`torch.nn.Linear`, no bias), the
settings every head shares, and runs the engine of :mod:`marginloss.fused`; a subclass
overrides :meth:`MarginHead.target` (and, if it needs them, the other hooks) and gets the
fused chunked engine, class sharding, PartialFC sampling, inference logits and checkpoints.

Common keyword arguments (all heads):

``scale`` (:math:`s`), ``reduction`` (``"mean"``), ``label_smoothing`` (0.0) and
``ignore_index`` (-100) behave as in :class:`torch.nn.CrossEntropyLoss`; ``chunk_size``
(``"auto"``) selects the engine path (``None`` = plain autograd, an int = the chunked engine
with that many classes per chunk, see :mod:`marginloss.fused`); ``device`` and ``dtype``
place the weight.

Class sharding (see :mod:`marginloss.distributed`): with ``process_group`` (default ``None``,
one process) a head holds only its rank's rows ``[shard_start, shard_start + shard_size)`` of
the classes and ``forward`` returns, on every rank, the loss of the global batch gathered
from all ranks; ``num_classes`` stays the total.  ``sample_rate`` (1.0) below 1 turns on
PartialFC sampling of each shard's classes in training mode, seeded from
``(sample_seed, rank, step)`` (``sample_seed`` 0; the step is the buffer ``sample_step``).
On a sharded head, ``cosine`` and the inference ``logits`` cover the local classes only.

State (step counters, EMA buffers) advances once per forward in training mode, never in eval
mode, and not during the replay of a forward that activation checkpointing
(:func:`torch.utils.checkpoint.checkpoint`) runs in backward: the replay sees the state the
first pass used (see :func:`marginloss.fused.replaying_forward`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from marginloss import _validation as V
from marginloss import fused, sharding
from marginloss.fused import ChunkSize, MarginContext

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# Norms in this range have float32 squares that neither overflow nor turn subnormal.
_SAFE_NORMS = (1e-15, 1e15)

__all__ = ["MarginContext", "MarginHead", "create_head", "list_heads", "register_head"]

# Attributes that differ between the ranks of one sharded head (not hyperparameters).
_RANK_LOCAL = frozenset({"rank", "shard_start", "shard_size", "training"})
_SHARED = frozenset(
    {"embedding_dim", "num_classes", "reduction", "label_smoothing", "ignore_index", "chunk_size",
     "sample_rate", "sample_seed", "world_size", "num_subcenters", "scale"}
)


class MarginHead(nn.Module):
    r"""Base class of the margin softmax heads: subclass it and define the margin.

    The loss of a head is the cross entropy (or, with ``loss_form = "sigmoid"``, the sum of
    per-class binary losses) of the logits

    .. math::
        t_i = \rho_{iy_i}\, f(\cos\theta_{iy_i}) + b, \qquad
        z_{ij} = \rho_{ij}\, g(\cos\theta_{ij}) + b \quad (j \ne y_i),

    where :math:`f` is :meth:`target`, :math:`g` is :meth:`non_target` (the identity unless
    overridden), :math:`b` the optional scalar ``bias`` and :math:`\rho = s` times
    :math:`\lVert x_i\rVert` unless ``normalize_embeddings`` and times :math:`\lVert w_j\rVert`
    unless ``normalize_weight``.  The base class itself has no margin: ``MarginHead(D, C,
    scale=16.0)`` is the normalised softmax (NormFace).

    Subclasses set these class attributes and override these methods:

    * ``normalize_embeddings``, ``normalize_weight`` (bool, default ``True``): the geometry.
    * ``loss_form``: ``"softmax"`` (default) or ``"sigmoid"``.
    * :meth:`target` ``(cos, context) -> Tensor``: the margin on the ``[B]`` target cosines, in
      cosine units.  Whatever it computes with, its own parameters and buffers or the
      ``context`` tensors (:class:`~marginloss.fused.MarginContext`), gets its exact gradient
      on every path (plain, chunked, sharded).
    * :meth:`non_target` ``(cos, context)``: an elementwise transform of the non-target
      cosines with per-row, gradient-free parameters (``[B, 1]`` views of context tensors);
      :meth:`non_target_grad` may give its derivative in closed form.
    * :meth:`prepare` ``(context)``: advances state before any logit is computed, once per
      step (when ``context.update_state``).
    * :meth:`row_loss` ``(target_logit, rest, rest_sum, context)``: replaces the row loss of
      ``loss_form`` (class weighting of a sigmoid form, say).
    * :meth:`hyperparameters`: the settings shown by ``repr`` and checked to agree across the
      ranks of a sharded head (by default every public ``bool``/``int``/``float``/``str``
      attribute the subclass sets).

    A learnable scalar ``bias`` (``self.bias = nn.Parameter(torch.zeros(()))``) is added to
    every logit; ``scale`` may be a float or a one-element buffer the head updates.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`, the embedding size.
    num_classes : int
        :math:`C`, the number of classes (over all ranks when sharded).
    scale : float or Tensor, default 64.0
        :math:`s` (the ArcFace paper's value for face recognition).
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :class:`torch.nn.CrossEntropyLoss`; ``"mean"`` averages over non-ignored rows.
    label_smoothing : float, default 0.0
        As in :class:`torch.nn.CrossEntropyLoss` (softmax form only).
    ignore_index : int, default -100
        Rows with this label contribute nothing.
    chunk_size : int, "auto" or None, default "auto"
        The engine path (see :mod:`marginloss.fused`).
    process_group : ProcessGroup, optional
        Shard the classes over this group (see :mod:`marginloss.distributed`).
    sample_rate : float, default 1.0
        PartialFC: the fraction of each shard's classes kept per training step.
    sample_seed : int, default 0
        Seeds the PartialFC draw together with the rank and the step.
    num_subcenters : int, default 1
        :math:`K` weight rows per class (the class cosine is the max over them); the weight is
        ``[num_classes * K, embedding_dim]``, class ``c``'s rows at ``c*K .. c*K + K - 1``.
    device, dtype : optional
        Where and how the weight is created.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"`` (the global batch when sharded)

    Examples
    --------
    A CosFace head with a learnable margin, in a few lines:

    >>> import torch, marginloss
    >>> class LearnedCosFace(marginloss.MarginHead):
    ...     def __init__(self, embedding_dim, num_classes, **kwargs):
    ...         super().__init__(embedding_dim, num_classes, scale=30.0, **kwargs)
    ...         self.margin = torch.nn.Parameter(torch.tensor(0.2))
    ...     def target(self, cos, context):
    ...         return cos - self.margin
    >>> head = LearnedCosFace(16, 100)
    >>> loss = head(torch.randn(8, 16), torch.randint(0, 100, (8,)))
    >>> loss.backward()
    >>> head.margin.grad is not None
    True
    """

    normalize_embeddings: ClassVar[bool] = True
    normalize_weight: ClassVar[bool] = True
    loss_form: ClassVar[str] = "softmax"

    weight: Tensor
    sample_step: Tensor
    shard_layout: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float | Tensor = 64.0,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        chunk_size: ChunkSize = "auto",
        process_group: ProcessGroup | None = None,
        sample_rate: float = 1.0,
        sample_seed: int = 0,
        num_subcenters: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = V.check_positive_int("embedding_dim", embedding_dim)
        self.num_classes = V.check_positive_int("num_classes", num_classes)
        self.num_subcenters = V.check_positive_int("num_subcenters", num_subcenters)
        V.check_choice("loss_form", type(self).loss_form, ("softmax", "sigmoid"))
        if isinstance(scale, Tensor):
            if scale.numel() != 1 or not scale.is_floating_point():
                raise ValueError(f"scale must be a positive float or a one-element floating tensor, got shape {tuple(scale.shape)}")
            self.register_buffer("scale", scale.detach().reshape(()).to(device=device))
        else:
            self.scale = V.check_float("scale", scale, low=0.0, low_open=True)
        self.reduction = V.check_choice("reduction", reduction, ("mean", "sum", "none"))
        self.label_smoothing = V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
        if self.label_smoothing > 0 and type(self).loss_form != "softmax":
            raise ValueError(f"label_smoothing must be 0 for a {type(self).loss_form}-form head, got {label_smoothing!r}")
        self.ignore_index = V.check_int64("ignore_index", ignore_index)
        self.chunk_size = V.check_chunk_size(chunk_size)
        self.sample_rate = V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        self.sample_seed = V.check_int64("sample_seed", sample_seed)
        self.process_group = process_group
        self.world_size, self.rank = sharding.world(process_group)
        self.shard_start, self.shard_size = sharding.shard_range(num_classes, self.world_size, self.rank)
        rows = self.shard_size * self.num_subcenters
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        if "bias" not in self._parameters and "bias" not in self._buffers:
            self.bias: Tensor | None = None
        if process_group is not None:
            layout = [num_classes, self.world_size, self.shard_start, self.shard_size]
            self.register_buffer("shard_layout", torch.tensor(layout, device=self.weight.device))
        if process_group is not None or self.sample_rate < 1.0:
            self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64, device=self.weight.device))
        self.reset_parameters()

    # ------------------------------------------------------------ the hooks

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        r"""The margin :math:`f` on the ``[B]`` target cosines, in cosine units.

        The base class has none: :math:`f(\cos\theta) = \cos\theta` (NormFace).
        """
        return cos

    def non_target(self, cos: Tensor, context: MarginContext) -> Tensor:
        """An elementwise transform :math:`g` of the non-target cosines (identity here).

        Called on ``[B, n]`` blocks of cosines; per-row parameters must broadcast as
        ``[B, 1]`` (``context.cos_target[:, None]``, say) and carry no gradient.
        """
        return cos

    def non_target_grad(self, cos: Tensor, context: MarginContext) -> Tensor:
        """The elementwise derivative of :meth:`non_target`, if a subclass gives it in closed
        form (otherwise autograd differentiates each chunk)."""
        return torch.ones_like(cos)

    def prepare(self, context: MarginContext) -> None:
        """Advance the head's state for this step (nothing here).

        Called once per forward, after the target cosines (``context.cos_target``) are known
        and before any logit is computed; advance state only when ``context.update_state``.
        """

    def row_loss(self, target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        """The ``[B]`` row losses from the target logits and the engine's row statistics.

        By default the softmax cross entropy (with label smoothing) or, for the sigmoid
        form, :math:`\\operatorname{softplus}(-t) + r`; see :mod:`marginloss.fused`.
        """
        if type(self).loss_form == "softmax":
            return fused.softmax_row_loss(target_logit, rest, rest_sum, context.num_classes, self.label_smoothing)
        return fused.sigmoid_row_loss(target_logit, rest)

    def hyperparameters(self) -> dict[str, Any]:
        """The head's own settings: what ``repr`` shows and sharded ranks must agree on.

        By default the scale and every public ``bool``/``int``/``float``/``str`` attribute a
        subclass sets; built-in heads list theirs.
        """
        found: dict[str, Any] = {}
        if isinstance(self.scale, float):
            found["scale"] = self.scale
        for key, value in vars(self).items():
            if key.startswith("_") or key in _SHARED or key in _RANK_LOCAL:
                continue
            if isinstance(value, (bool, int, float, str)):
                found[key] = value
        return found

    # ------------------------------------------------------------ the loss

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(MarginHead, name)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of a batch: ``embeddings`` ``[B, D]``, ``labels`` ``[B]`` class indices.

        Every check runs inside the engine, so that on a sharded head a bad input on one rank
        raises the same error on every rank instead of stranding the others.
        """
        sampling = self.training and self.sample_rate < 1.0
        replay = fused.replaying_forward()
        step = 0
        if sampling:
            # Read on the host only when sampling needs it (a device sync on GPU); a replay
            # draws what its first pass drew.
            step = int(self.sample_step) - (1 if replay else 0)
        sharded = self.process_group is not None
        custom_non_target = self._overrides("non_target")
        loss = fused.margin_loss(
            embeddings, self.weight, labels, self.target,
            non_target=self.non_target if custom_non_target else None,
            non_target_grad=self.non_target_grad if custom_non_target and self._overrides("non_target_grad") else None,
            prepare=self.prepare if self._overrides("prepare") else None,
            row_loss=self.row_loss if self._overrides("row_loss") else None,
            scale=self.scale, bias=self.bias,
            normalize_embeddings=type(self).normalize_embeddings,
            normalize_weight=type(self).normalize_weight,
            num_subcenters=self.num_subcenters, loss_form=type(self).loss_form,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            num_classes=self.num_classes, process_group=self.process_group,
            sample_rate=self.sample_rate if sampling else 1.0, sample_seed=self.sample_seed,
            sample_step=step, training=self.training, update_state=self.training,
            digest=self._digest() if sharded else 0,
            state_digest=self._state_digest() if sharded else None,
            describe=self._describe if sharded else None,
        )
        if sampling and not replay:
            self.sample_step.add_(1)
        return loss

    # ------------------------------------------------------------ agreement across ranks

    def _state_tensors(self) -> Iterator[tuple[str, Tensor]]:
        for name, buffer in self.named_buffers():
            if name != "shard_layout":
                yield name, buffer
        for name, parameter in self.named_parameters():
            if name != "weight":
                yield name, parameter

    def _digest(self) -> int:
        text = f"{type(self).__module__}.{type(self).__qualname__}:{sorted(self.hyperparameters().items())!r}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)

    def _state_digest(self) -> Tensor:
        """One float64 number on the weight's device that changes with any buffer or
        parameter other than ``weight`` (computed there: no host round trip)."""
        total = torch.zeros((), dtype=torch.float64, device=self.weight.device)
        for position, (_, tensor) in enumerate(self._state_tensors()):
            values = tensor.detach().flatten().to(torch.float64)
            ramp = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=values.device)
            total = total + (values * (ramp * 0.6180339887 + position + 1.0)).sum()
        return total

    def _describe(self) -> dict[str, Any]:
        described: dict[str, Any] = dict(self.hyperparameters())
        for name, tensor in self._state_tensors():
            described[name] = tensor.detach().cpu().tolist()
        return described

    # ------------------------------------------------------------ inference and storage

    def reset_parameters(self) -> None:
        """Xavier-uniform initialisation of ``weight`` (the papers' Caffe ``xavier`` filler).

        A class-sharded head draws its rows with the bound of the full matrix, from a
        random stream of each rank's own.
        """
        if self.process_group is not None:
            sharding.init_shard_(self.weight, self.num_classes * self.num_subcenters, self.rank)
            return
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, embeddings: Tensor) -> Tensor:
        r"""``[B, C]`` cosine similarities :math:`\cos\theta_{ij}` between embeddings and class
        weights (the max over each class's sub-centres)."""
        V.check_embeddings(embeddings, self.embedding_dim)
        compute = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        x = embeddings.to(compute)
        w = self.weight.to(compute)
        x = x * fused.safe_reciprocal(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)).to(compute)[:, None]
        w = w * fused.safe_reciprocal(torch.linalg.vector_norm(w, dim=1)).to(compute)[:, None]
        cosine: Tensor = x @ w.T
        if self.num_subcenters > 1:
            cosine = cosine.unflatten(1, (-1, self.num_subcenters)).amax(dim=2)
        return cosine

    def _inference_logits(self, embeddings: Tensor) -> Tensor:
        r""":math:`\rho_{ij}\cos\theta_{ij}` (+ bias) in about as many operations as the plain
        formula: :math:`(x\,a_i)\,w'^\top_j` with :math:`a_i = s/\lVert x_i\rVert` (or
        :math:`s`) and :math:`w' = \hat w` (or :math:`w`), the max over sub-centres.

        The embedding norms are float32 when every row's norm lies where float32 squares
        neither overflow nor lose bits to subnormals (read with the value check, on the CPU
        or with validation on), float64 otherwise.
        """
        V.check_embeddings(embeddings, self.embedding_dim, check_values=False)
        compute = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        x = embeddings.to(compute)
        w = self.weight.to(compute)
        scale = self.scale.to(compute) if isinstance(self.scale, Tensor) else self.scale
        checked = x.numel() > 0 and (x.device.type == "cpu" or V.values_checked(x)) and not torch.compiler.is_compiling()
        if type(self).normalize_embeddings:
            norms = torch.linalg.vector_norm(x, dim=1)
            safe_range = False
            if checked:
                low, high = (float(v) for v in torch.aminmax(norms.detach()))
                if not math.isfinite(high):
                    V.check_embeddings(embeddings, self.embedding_dim)  # names NaN/inf entries
                safe_range = _SAFE_NORMS[0] <= low and high <= _SAFE_NORMS[1]
            if not safe_range:
                norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
            x = x * (fused.safe_reciprocal(norms) * scale).to(compute)[:, None]
        else:
            if checked:
                V.check_embeddings(embeddings, self.embedding_dim)
            x = x * scale
        if type(self).normalize_weight:
            w = w * fused.safe_reciprocal(torch.linalg.vector_norm(w, dim=1))[:, None]
        logits: Tensor = x @ w.T
        if self.num_subcenters > 1:
            logits = logits.unflatten(1, (-1, self.num_subcenters)).amax(dim=2)
        if self.bias is not None:
            logits = logits + self.bias.to(compute)
        return logits

    def _radius(self, embeddings: Tensor, cosine: Tensor) -> Tensor:
        x_norm = torch.linalg.vector_norm(embeddings, dim=1, dtype=torch.float64).to(cosine.dtype)
        scale = self.scale.to(cosine.dtype) if isinstance(self.scale, Tensor) else self.scale
        radius = torch.full_like(x_norm, 1.0)[:, None] * scale
        if not type(self).normalize_embeddings:
            radius = radius * x_norm[:, None]
        if not type(self).normalize_weight:
            w_norm = self.weight.detach().to(cosine.dtype).norm(dim=1)
            if self.num_subcenters > 1:
                w_norm = w_norm.unflatten(0, (-1, self.num_subcenters)).amax(dim=1)
            radius = radius * w_norm[None, :]
        return radius

    def logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """``[B, C]`` logits: with ``labels`` the training (margin) logits, else inference logits.

        Inference logits are :math:`\\rho_{ij}\\cos\\theta_{ij}` (+ bias): no margin, no
        non-target transform.  Materialises the full matrix; for the loss use ``forward``,
        which need not.  The margin logits do not advance the head's state.
        """
        if labels is not None and self.process_group is not None:
            raise ValueError(
                f"logits(embeddings, labels) needs every class, but this class-sharded head holds "
                f"classes [{self.shard_start}, {self.shard_start + self.shard_size}) only: use forward "
                f"for the loss, or marginloss.distributed.gather_weight for the full weight"
            )
        if labels is None and (self.num_subcenters == 1 or type(self).normalize_weight):
            return self._inference_logits(embeddings)
        cosine = self.cosine(embeddings)
        radius = self._radius(embeddings, cosine)
        bias = 0.0 if self.bias is None else self.bias.to(cosine.dtype)
        if labels is None:
            return radius * cosine + bias
        labels = V.check_labels(labels, cosine.shape[0], self.num_classes, self.ignore_index)
        valid = labels != self.ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        wide = torch.float64 if cosine.device.type != "mps" else torch.float32
        x_norm = torch.linalg.vector_norm(embeddings, dim=1, dtype=wide)
        rows = self.weight.unflatten(0, (-1, self.num_subcenters))[safe]  # [B, K, D]
        row_norms = torch.linalg.vector_norm(rows, dim=2, dtype=wide)
        # The target's winning sub-centre: the row with the largest cosine.
        winner = (rows.to(wide) @ embeddings.to(wide)[:, :, None]).squeeze(2).mul(1.0 / row_norms).argmax(dim=1)
        w_norm = row_norms.gather(1, winner[:, None]).squeeze(1)
        context = MarginContext(
            labels=safe, valid=valid, embedding_norms=x_norm, weight_norms=w_norm, training=self.training,
            update_state=False, num_classes=self.num_classes, scale=self.scale,
        )
        cos_target = cosine.gather(1, safe[:, None]).squeeze(1).to(wide)
        context.cos_target = cos_target.detach()
        rest = radius * self.non_target(cosine, context) + bias
        value = self.target(cos_target, context).to(cosine.dtype)
        target = radius.expand_as(cosine).gather(1, safe[:, None]).squeeze(1) * value + bias
        current = rest.gather(1, safe[:, None]).squeeze(1)
        return rest.scatter(1, safe[:, None], torch.where(valid, target, current)[:, None])

    def extra_repr(self) -> str:
        fields = [f"embedding_dim={self.embedding_dim}", f"num_classes={self.num_classes}"]
        if self.num_subcenters > 1:
            fields.append(f"num_subcenters={self.num_subcenters}")
        fields += [f"{k}={v!r}" for k, v in self.hyperparameters().items()]
        fields += [
            f"reduction={self.reduction!r}", f"label_smoothing={self.label_smoothing!r}",
            f"ignore_index={self.ignore_index!r}", f"chunk_size={self.chunk_size!r}",
        ]
        if self.process_group is not None:
            end = self.shard_start + self.shard_size
            fields.append(f"process_group=<rank {self.rank} of {self.world_size}, classes [{self.shard_start}, {end})>")
        if self.sample_rate < 1.0:
            fields += [f"sample_rate={self.sample_rate!r}", f"sample_seed={self.sample_seed!r}"]
        return ", ".join(fields)


# ---------------------------------------------------------------- the registry

HeadT = TypeVar("HeadT", bound=type[MarginHead])
_REGISTRY: dict[str, type[MarginHead]] = {}


def register_head(name: str) -> Callable[[HeadT], HeadT]:
    """Class decorator: make a :class:`MarginHead` subclass available as ``create_head(name)``.

    Examples
    --------
    >>> import marginloss
    >>> @marginloss.register_head("my_normface")
    ... class MyNormFace(marginloss.MarginHead):
    ...     pass
    >>> "my_normface" in marginloss.list_heads()
    True
    """
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"name must be a non-empty lower-case str, got {name!r}")

    def decorate(cls: HeadT) -> HeadT:
        if not (isinstance(cls, type) and issubclass(cls, MarginHead)):
            raise TypeError(f"register_head({name!r}) decorates MarginHead subclasses, got {cls!r}")
        existing = _REGISTRY.get(name)
        # The same class imported a second time (a module reloaded, doctest collection) is
        # not a clash; another class under the same name is.
        same = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
        if existing is not None and existing is not cls and not same:
            raise ValueError(f"a head is already registered as {name!r}: {existing.__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_heads() -> list[str]:
    """The names :func:`create_head` accepts, sorted (lower-case file stems: ``"arcface"``, ...).

    Examples
    --------
    >>> import marginloss
    >>> "arcface" in marginloss.list_heads()
    True
    """
    return sorted(_REGISTRY)


def create_head(name: str, embedding_dim: int, num_classes: int, **kwargs: Any) -> MarginHead:
    """Build the head registered as ``name`` with ``(embedding_dim, num_classes, **kwargs)``.

    Examples
    --------
    >>> import marginloss
    >>> head = marginloss.create_head("cosface", 16, 100, margin=0.4)
    >>> type(head).__name__, head.margin
    ('CosFace', 0.4)
    """
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {list_heads()}, got {name!r}")
    return _REGISTRY[name](embedding_dim, num_classes, **kwargs)
