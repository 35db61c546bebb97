"""Metric-learning losses on embeddings, one file per loss.

Each loss is a pure function plus a thin module holding its hyperparameters (and, for the
center and SoftTriple losses, learned centers), with the same argument names in the same
order.  All compute in at least ``float32``, also under autocast, and give a defined,
documented value (never NaN) for batches without positive or negative pairs.

========================================  =========================================  =========================
module                                    function                                   source
========================================  =========================================  =========================
:class:`~marginloss.CenterLoss`           :func:`~marginloss.center_loss`            Wen et al., ECCV 2016
:class:`~marginloss.TripletLoss`          :func:`~marginloss.triplet_loss`           Schroff et al., CVPR 2015
:class:`~marginloss.ContrastiveLoss`      :func:`~marginloss.contrastive_loss`       Hadsell et al., CVPR 2006
:class:`~marginloss.QuadrupletLoss`       :func:`~marginloss.quadruplet_loss`        Chen et al., CVPR 2017
:class:`~marginloss.NPairLoss`            :func:`~marginloss.npair_loss`             Sohn, NeurIPS 2016
:class:`~marginloss.LiftedStructureLoss`  :func:`~marginloss.lifted_structure_loss`  Song et al., CVPR 2016
:class:`~marginloss.MultiSimilarityLoss`  :func:`~marginloss.multi_similarity_loss`  Wang et al., CVPR 2019
:class:`~marginloss.SoftTripleLoss`       :func:`~marginloss.soft_triple_loss`       Qian et al., ICCV 2019
:class:`~marginloss.RangeLoss`            :func:`~marginloss.range_loss`             Zhang et al., ICCV 2017
:class:`~marginloss.MarginalLoss`         :func:`~marginloss.marginal_loss`          Deng et al., CVPRW 2017
========================================  =========================================  =========================
"""

from __future__ import annotations

from marginloss.losses.center import CenterLoss, center_loss
from marginloss.losses.contrastive import ContrastiveLoss, contrastive_loss
from marginloss.losses.lifted_structure import LiftedStructureLoss, lifted_structure_loss
from marginloss.losses.marginal import MarginalLoss, marginal_loss
from marginloss.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from marginloss.losses.npair import NPairLoss, npair_loss
from marginloss.losses.quadruplet import QuadrupletLoss, quadruplet_loss
from marginloss.losses.range import RangeLoss, range_loss
from marginloss.losses.soft_triple import SoftTripleLoss, soft_triple_loss
from marginloss.losses.triplet import TripletLoss, triplet_loss

__all__ = [
    "CenterLoss",
    "ContrastiveLoss",
    "LiftedStructureLoss",
    "MarginalLoss",
    "MultiSimilarityLoss",
    "NPairLoss",
    "QuadrupletLoss",
    "RangeLoss",
    "SoftTripleLoss",
    "TripletLoss",
    "center_loss",
    "contrastive_loss",
    "lifted_structure_loss",
    "marginal_loss",
    "multi_similarity_loss",
    "npair_loss",
    "quadruplet_loss",
    "range_loss",
    "soft_triple_loss",
    "triplet_loss",
]
