"""Compiler passes: one function per file, named by a verb, each ``(value, ctx) -> PassResult``."""

from muxc.passes.fuse_lm_head_loss import fuse_lm_head_loss
from muxc.passes.fuse_swiglu import fuse_swiglu
from muxc.passes.merge_backbones import merge_backbones
from muxc.passes.native_gqa import native_gqa
from muxc.passes.partition import partition
from muxc.passes.pass_base import CompileContext, PassResult
from muxc.passes.plan_recompute import plan_recompute
from muxc.passes.replay_adapter_inputs import replay_adapter_inputs
from muxc.passes.rewrite_attention import rewrite_attention
from muxc.passes.select_kernels import select_kernels
from muxc.passes.share_frozen_weights import share_frozen_weights
from muxc.passes.trace_tasks import trace_tasks
from muxc.passes.validate_tasks import validate_tasks

__all__ = ["validate_tasks", "trace_tasks", "share_frozen_weights", "merge_backbones",
           "rewrite_attention", "native_gqa", "fuse_swiglu", "fuse_lm_head_loss",
           "replay_adapter_inputs", "partition", "select_kernels", "plan_recompute",
           "CompileContext", "PassResult"]
