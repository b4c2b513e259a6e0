"""Older import path of the privacy accountant, kept so ``dpagg_core.privacy.accountant.X`` keeps
working for tests, bench scripts, the ComfyUI nodes and the WebUI tab (issue 19 item 4 split it
by job). ``dpagg_core`` itself imports from the homes:

* :mod:`dpagg_core.privacy.plan`: :class:`PrivacyPlan` (validated once, on construction), the
  parameter rules (:func:`check_parameters`, :func:`check_neighbouring`,
  :func:`check_noise_multiplier`), the constants (samplings, relations, ``DEFAULT_DELTA``,
  accountant names, noise-multiplier range);
* :mod:`dpagg_core.privacy.bounds`: epsilon of a plan per mode (:func:`epsilon_for`,
  :func:`profile_epsilon`, :func:`rdp_wor_epsilon`), the DpEvents and their composition for the
  ledger (:func:`dp_events`, :func:`composed_epsilon`); its docstring has the modes table and
  the dp-accounting ``noise_multiplier`` trap;
* :mod:`dpagg_core.privacy.plan_text`: :func:`plan_summary`, :data:`DELTA_MEANING`,
  :func:`delta_warning`.

The old private names (``_pld_interval``, ``_Setting``, ...) stay as aliases of the public ones.
"""

from __future__ import annotations

from dpagg_core.privacy.bounds import (
    PLD_COARSE_MAX,
    PLD_COARSE_SLACK,
    PLD_MAX_INTERVAL,
    PLD_MIN_INTERVAL,
    PLD_SLACK,
    RDP_HIGH_ORDERS,
    RDP_ORDERS,
    analytic_gaussian_epsilon,
    bbg_wor_epsilon,
    clear_caches,
    composed_epsilon,
    dp_events,
    epsilon_for,
    epsilon_of_setting,
    gaussian_event,
    pld_gaussian_epsilon,
    pld_interval,
    pld_poisson_epsilon,
    pld_relation,
    poisson_event,
    profile_epsilon,
    rdp_wor_bound,
    rdp_wor_epsilon,
    rdp_wor_orders,
)
from dpagg_core.privacy.plan import (
    ACC_ANALYTIC,
    ACC_BBG,
    ACC_PLD,
    ACC_PLD_POISSON,
    ACC_PLD_UNAMPLIFIED,
    ACC_RDP_WOR,
    DEFAULT_DELTA,
    LEGACY_NEIGHBOURINGS,
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    NEIGHBOURINGS,
    SAMPLINGS,
    PrivacyPlan,
    Sampling,
    Setting,
    add_remove_error,
    as_float,
    as_int,
    check_neighbouring,
    check_noise_multiplier,
    check_parameters,
    checked_plan,
    plan_from_setting,
)
from dpagg_core.privacy.plan_text import DELTA_MEANING, delta_warning, plan_summary

# The names these had before the split.
_Setting = Setting
_as_int = as_int
_as_float = as_float
_plan = plan_from_setting
_analytic_gaussian_epsilon = analytic_gaussian_epsilon
_pld_interval = pld_interval
_gaussian_event = gaussian_event
_poisson_event = poisson_event
_pld_gaussian_epsilon = pld_gaussian_epsilon
_pld_poisson_epsilon = pld_poisson_epsilon
_rdp_wor_orders = rdp_wor_orders
_rdp_wor = rdp_wor_bound
_bbg_wor_epsilon = bbg_wor_epsilon
_epsilon = epsilon_of_setting

__all__ = [
    "ACC_ANALYTIC",
    "ACC_BBG",
    "ACC_PLD",
    "ACC_PLD_POISSON",
    "ACC_PLD_UNAMPLIFIED",
    "ACC_RDP_WOR",
    "DEFAULT_DELTA",
    "DELTA_MEANING",
    "LEGACY_NEIGHBOURINGS",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "NEIGHBOURINGS",
    "PLD_COARSE_MAX",
    "PLD_COARSE_SLACK",
    "PLD_MAX_INTERVAL",
    "PLD_MIN_INTERVAL",
    "PLD_SLACK",
    "RDP_HIGH_ORDERS",
    "RDP_ORDERS",
    "SAMPLINGS",
    "PrivacyPlan",
    "Sampling",
    "Setting",
    "add_remove_error",
    "analytic_gaussian_epsilon",
    "as_float",
    "as_int",
    "bbg_wor_epsilon",
    "check_neighbouring",
    "check_noise_multiplier",
    "check_parameters",
    "checked_plan",
    "clear_caches",
    "composed_epsilon",
    "delta_warning",
    "dp_events",
    "epsilon_for",
    "epsilon_of_setting",
    "gaussian_event",
    "plan_from_setting",
    "plan_summary",
    "pld_gaussian_epsilon",
    "pld_interval",
    "pld_poisson_epsilon",
    "pld_relation",
    "poisson_event",
    "profile_epsilon",
    "rdp_wor_bound",
    "rdp_wor_epsilon",
    "rdp_wor_orders",
]
