r"""Pure tensor math of the margin heads: one import for every per-head function.

Three layers, each usable on its own (each head's three live in its file under
:mod:`marginloss.heads`):

* **Target transforms** map the target cosine :math:`\cos\theta_{y}` (a ``[B]`` tensor) to
  the head's margin cosine :math:`f(\cos\theta_y)`: :func:`arcface_target`,
  :func:`cosface_target`, :func:`combined_margin_target`, :func:`sphereface_target` (also
  L-Softmax's), built on :func:`angular_psi`.
* **Margin logits** apply a transform to a ``[B, C]`` cosine matrix you computed yourself,
  touching only the target column: :func:`arcface_logits`, :func:`cosface_logits`,
  :func:`combined_margin_logits`, :func:`sphereface_logits`, :func:`lsoftmax_logits`,
  and :func:`margin_cross_entropy` for their loss.
* **Losses** from embeddings and class weights, with the same arguments as the modules:
  :func:`arcface`, :func:`cosface`, :func:`combined_margin`, :func:`sphereface`,
  :func:`lsoftmax`, :func:`normface`.  They run the engine in :mod:`marginloss.fused`.
* **Metric-learning losses** on embeddings (the functional twins of
  :mod:`marginloss.losses`): :func:`center_loss`, :func:`triplet_loss`,
  :func:`contrastive_loss`, :func:`quadruplet_loss`, :func:`npair_loss`,
  :func:`lifted_structure_loss`, :func:`multi_similarity_loss`, :func:`soft_triple_loss`,
  :func:`range_loss`, :func:`marginal_loss`.

Margins are in radians.  Gradients are the exact derivatives of the formulas.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss.fused import reduce_rows, softmax_row_loss
from marginloss.heads.adacos import adacos, adacos_dynamic_scale, adacos_fixed_scale
from marginloss.heads.adaface import (
    adaface,
    adaface_batch_statistics,
    adaface_logits,
    adaface_margin_scaler,
    adaface_target,
)
from marginloss.heads.arcface import arcface, arcface_logits, arcface_target
from marginloss.heads.combined_margin import (
    combined_margin,
    combined_margin_logits,
    combined_margin_target,
)
from marginloss.heads.cosface import cosface, cosface_logits, cosface_target
from marginloss.heads.curricularface import (
    curricularface,
    curricularface_logits,
    curricularface_non_target,
)
from marginloss.heads.elasticface import (
    elastic_margins,
    elasticface,
    elasticface_logits,
    elasticface_target,
)
from marginloss.heads.lgm import lgm, lgm_logits
from marginloss.heads.lsoftmax import lsoftmax, lsoftmax_logits, lsoftmax_target
from marginloss.heads.magface import (
    magface,
    magface_logits,
    magface_margin,
    magface_regularizer,
    magface_target,
)
from marginloss.heads.normface import normface
from marginloss.heads.sphereface import (
    angular_psi,
    annealing_lambda,
    sphereface,
    sphereface_logits,
    sphereface_target,
)
from marginloss.heads.sphereface2 import (
    sphereface2,
    sphereface2_adjust,
    sphereface2_bias_init,
    sphereface2_logits,
    sphereface2_non_target,
    sphereface2_target,
)
from marginloss.heads.subcenter_arcface import subcenter_arcface, subcenter_arcface_logits
from marginloss.heads.uniface import uniface, uniface_bias_init, uniface_logits, uniface_target
from marginloss.heads.uniformface import uniform_loss, uniformface, update_centers
from marginloss.losses import (
    center_loss,
    contrastive_loss,
    lifted_structure_loss,
    marginal_loss,
    multi_similarity_loss,
    npair_loss,
    quadruplet_loss,
    range_loss,
    soft_triple_loss,
    triplet_loss,
)

__all__ = [
    "adacos",
    "adacos_dynamic_scale",
    "adacos_fixed_scale",
    "adaface",
    "adaface_batch_statistics",
    "adaface_logits",
    "adaface_margin_scaler",
    "adaface_target",
    "angular_psi",
    "annealing_lambda",
    "arcface",
    "arcface_logits",
    "arcface_target",
    "center_loss",
    "combined_margin",
    "combined_margin_logits",
    "combined_margin_target",
    "contrastive_loss",
    "cosface",
    "cosface_logits",
    "cosface_target",
    "curricularface",
    "curricularface_logits",
    "curricularface_non_target",
    "elastic_margins",
    "elasticface",
    "elasticface_logits",
    "elasticface_target",
    "lgm",
    "lgm_logits",
    "lifted_structure_loss",
    "lsoftmax",
    "lsoftmax_logits",
    "lsoftmax_target",
    "magface",
    "magface_logits",
    "magface_margin",
    "magface_regularizer",
    "magface_target",
    "margin_cross_entropy",
    "marginal_loss",
    "multi_similarity_loss",
    "normface",
    "npair_loss",
    "quadruplet_loss",
    "range_loss",
    "soft_triple_loss",
    "sphereface",
    "sphereface2",
    "sphereface2_adjust",
    "sphereface2_bias_init",
    "sphereface2_logits",
    "sphereface2_non_target",
    "sphereface2_target",
    "sphereface_logits",
    "sphereface_target",
    "subcenter_arcface",
    "subcenter_arcface_logits",
    "triplet_loss",
    "uniface",
    "uniface_bias_init",
    "uniface_logits",
    "uniface_target",
    "uniform_loss",
    "uniformface",
    "update_centers",
]


def margin_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""Cross entropy of margin logits, computed in at least float32.

    Equals :func:`torch.nn.functional.cross_entropy` (same ``label_smoothing`` and
    ``ignore_index`` semantics) except that an all-ignored batch gives 0 instead of NaN, and
    that the target term is evaluated as :math:`\operatorname{softplus}(r_i - z_{iy_i})` with
    :math:`r_i = \log\sum_{j\ne y_i}e^{z_{ij}}`, which keeps full precision as
    :math:`p_{y_i}\to 1`.

    Examples
    --------
    >>> import torch
    >>> z, y = torch.randn(5, 7), torch.tensor([0, 6, 2, -100, 3])
    >>> ref = torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1)
    >>> bool(torch.allclose(margin_cross_entropy(z, y, label_smoothing=0.1), ref))
    True
    """
    V.check_choice("reduction", reduction, ("mean", "sum", "none"))
    label_smoothing = V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"shape {tuple(logits.shape)}, dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating [batch, num_classes] tensor, got {got}")
    labels = V.check_labels(labels, logits.shape[0], logits.shape[1], ignore_index)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = z.gather(1, safe[:, None]).squeeze(1)
    lse_rest = z.scatter(1, safe[:, None], -math.inf).logsumexp(dim=1)
    sum_rest = z.sum(dim=1) - target
    row = softmax_row_loss(target, lse_rest, sum_rest, z.shape[1], label_smoothing)
    return reduce_rows(row, valid, reduction)
