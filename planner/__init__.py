"""MEMO memory planner: activation swap fraction and dynamic storage allocation plans.

Allocation plans
    ``solve_dsa(tensors, config)``: offsets for tensors with lifetimes in one arena of least
    size (MIP solved by HiGHS, with greedy plans as warm start and fallback).
    ``best_fit`` / ``first_fit``: the greedy plans alone. ``verify_plan(plan)`` raises
    ``PlanError`` on any overlap, negative or unaligned offset.
    ``plan_iteration(phases, cross_step_tensors, config)``: the bi-level plan of one training
    iteration; block phases are solved once each, then placed with the cross-step tensors.

Swap fraction
    ``swap_fraction(inputs)`` (closed form) and ``swap_fraction_lp(inputs)`` (LP, HiGHS).

Profiling
    ``profile_block(block, inputs)``: forward/backward time and the allocation trace of one
    block; ``BlockProfile.lifetimes()`` / ``.phase_lifetimes(phase)`` turn it into DSA input.

Cache
    ``PlanCache(directory)`` stores plans as JSON under ``plan_key(model, shapes, dtype, device)``.
"""
from planner.bilevel import BlockPhase, IterationPlan, plan_iteration
from planner.cache import PlanCache, PlanCacheWarning, default_cache_dir, device_name, plan_key
from planner.dsa import DsaConfig, solve_dsa
from planner.heuristics import best_fit, first_fit
from planner.plan import OffsetPlan, PlanError, verify_plan
from planner.profile import AllocationEvent, BlockProfile, PhaseLifetimes, ProfileConfig, profile_block
from planner.swap import SwapFraction, SwapInputs, swap_fraction, swap_fraction_lp
from planner.tensors import TensorLifetime

__all__ = [
    "AllocationEvent",
    "BlockPhase",
    "BlockProfile",
    "DsaConfig",
    "IterationPlan",
    "OffsetPlan",
    "PhaseLifetimes",
    "PlanCache",
    "PlanCacheWarning",
    "PlanError",
    "ProfileConfig",
    "SwapFraction",
    "SwapInputs",
    "TensorLifetime",
    "best_fit",
    "default_cache_dir",
    "device_name",
    "first_fit",
    "plan_iteration",
    "plan_key",
    "profile_block",
    "solve_dsa",
    "swap_fraction",
    "swap_fraction_lp",
    "verify_plan",
]
