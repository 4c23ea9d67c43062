"""Weightings: every method's math on its own, as an :class:`optax_balance.Weighting`.

A weighting maps per-task statistics (a Gramian, norms, losses, ...) and its state to
task weights and the next state. ``ob.<name>(...)`` is
``ob.balance(ob.weightings.<name>(...), ...)``; use the weightings directly to wrap one
method in another (:func:`optax_balance.cr_mogm`), to write your own, or to get weights
from a Gramian you computed yourself::

    weights, state = ob.weightings.upgrad()(gram)
"""

from optax_balance._gramian._aligned_mtl import aligned_mtl_weighting as aligned_mtl
from optax_balance._gramian._cagrad import cagrad_weighting as cagrad
from optax_balance._gramian._con_fig import con_fig_weighting as con_fig
from optax_balance._gramian._dualproj import dualproj_weighting as dualproj
from optax_balance._gramian._fairgrad import fairgrad_weighting as fairgrad
from optax_balance._gramian._gradvac import gradvac_weighting as gradvac
from optax_balance._gramian._imtl import imtl_weighting as imtl
from optax_balance._gramian._imtl_g import imtl_g_weighting as imtl_g
from optax_balance._gramian._krum import krum_weighting as krum
from optax_balance._gramian._mgda import mgda_weighting as mgda
from optax_balance._gramian._modo import modo_weighting as modo
from optax_balance._gramian._nash_mtl import nash_mtl_weighting as nash_mtl
from optax_balance._gramian._pcd import pcd_weighting as pcd
from optax_balance._gramian._pcgrad import pcgrad_weighting as pcgrad
from optax_balance._gramian._sdmgrad import sdmgrad_weighting as sdmgrad
from optax_balance._gramian._upgrad import upgrad_weighting as upgrad
from optax_balance._jacobian._db_mtl import db_mtl_weighting as db_mtl
from optax_balance._jacobian._excess_mtl import excess_mtl_weighting as excess_mtl
from optax_balance._jacobian._graddrop import graddrop_weighting as graddrop
from optax_balance._jacobian._moco import moco_weighting as moco
from optax_balance._jacobian._trimmed_mean import trimmed_mean_weighting as trimmed_mean
from optax_balance._loss._cosmos import cosmos_weighting as cosmos
from optax_balance._loss._dwa import dwa_weighting as dwa
from optax_balance._loss._famo import famo_weighting as famo
from optax_balance._loss._gls import gls_weighting as gls
from optax_balance._loss._imtl_l import imtl_l_weighting as imtl_l
from optax_balance._loss._linear import constant_weighting as constant
from optax_balance._loss._linear import mean_weighting as mean
from optax_balance._loss._linear import sum_weighting as sum  # ob.weightings.sum
from optax_balance._loss._pbi import pbi_weighting as pbi
from optax_balance._loss._rlw import rlw_weighting as rlw
from optax_balance._loss._stch import stch_weighting as stch
from optax_balance._loss._uw import uw_weighting as uw
from optax_balance._norm._balancer import balancer_weighting as balancer
from optax_balance._norm._gradnorm import gradnorm_weighting as gradnorm
from optax_balance._norm._metabalance import metabalance_weighting as metabalance
from optax_balance._wrappers._cr_mogm import cr_mogm_weighting as cr_mogm

__all__ = [
    "aligned_mtl",
    "balancer",
    "cagrad",
    "con_fig",
    "constant",
    "cosmos",
    "cr_mogm",
    "db_mtl",
    "dualproj",
    "dwa",
    "excess_mtl",
    "fairgrad",
    "famo",
    "gls",
    "graddrop",
    "gradnorm",
    "gradvac",
    "imtl",
    "imtl_g",
    "imtl_l",
    "krum",
    "mean",
    "metabalance",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pbi",
    "pcd",
    "pcgrad",
    "rlw",
    "sdmgrad",
    "stch",
    "sum",
    "trimmed_mean",
    "upgrad",
    "uw",
]
