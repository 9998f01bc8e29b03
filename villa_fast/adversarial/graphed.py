"""The adversarial step captured whole in one CUDA graph per input shape.

At B = 32 the eager step of a UNITER-base model is bound by the host launching its kernels; replaying one
graph removes the launch gaps. What the capture needs:

- static input buffers, filled with ``copy_`` before each replay; outputs cloned after it, so that the
  graphs of all signatures can share one memory pool (they are replayed one at a time);
- a warm-up on a side stream before capture (Triton JIT, cuBLAS handles, optimizer state), whose effect
  on the parameters, gradients, optimizer state and loss scale is undone before capturing;
- no host sync and no data-dependent shapes inside: the step already keeps every decision on the device,
  the optimizer must be capturable (``torch.optim.AdamW(fused=True, capturable=True)``, or
  ``villa_fast.train.optim.AdamW(capturable=True)``) with a tensor learning rate (updated in place by
  the schedule), and clipping uses :func:`clip_grad_norm_capturable_`;
- dropout draws from the default CUDA generator, which the graph advances at every replay, so masks
  differ across replays;
- ``clean_backward="recompute"``: the clean pass draws from its own two copies of the generator state
  (:class:`~villa_fast.adversarial.rng.ForkedRng`, one for the forward, one for its recomputation in the
  final backward), registered with the graph, so every replay recomputes with the masks it drew.

Without CUDA, or when a capture fails, the same step runs eagerly and says so once.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from villa_fast.adversarial.config import AdversarialConfig, _real
from villa_fast.adversarial.rng import ForkedRng, graphsafe_rng_available
from villa_fast.adversarial.step import StepResult, VillaStep

log = logging.getLogger("villa_fast.adversarial")

# non-tensor batch values a graph may freeze: compared by value in the graph's key
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def clip_grad_norm_capturable_(
    params: Tensor | Iterable[Tensor], max_norm: float | Tensor, eps: float = 1e-6
) -> Tensor:
    """Scale gradients so that their total 2-norm is at most ``max_norm``, without a host sync.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: coef = min(1, max_norm / (total + eps)), applied to
    every gradient; returns the total norm before clipping (0-dim device tensor). ``params`` is an iterable of
    tensors or a single tensor; ``max_norm`` a number > 0 (``inf``: no clipping) or a one-element tensor, whose
    value is not checked (that would read it back to the host).
    """
    if isinstance(max_norm, Tensor):
        if max_norm.numel() != 1 or not max_norm.is_floating_point():
            raise ValueError(f"max_norm must be a number > 0 or a floating one-element tensor, got {max_norm!r}")
    elif isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not max_norm > 0:
        # 0 would zero every gradient, a negative number flip their signs, NaN make them NaN
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
    if isinstance(params, Tensor):
        params = [params]  # one tensor, as torch.nn.utils.clip_grad_norm_ takes it (not its rows)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    total = torch.linalg.vector_norm(torch.stack([n.to(acc) for n in norms]))
    coef = torch.clamp(max_norm / (total + eps), max=1.0)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, gs in by_dtype.items():
        torch._foreach_mul_(gs, coef.to(dtype))
    return total


class _Graph:
    """One captured step: the graph, its static inputs and its static outputs."""

    def __init__(
        self,
        graph: Any,
        leaves: list[Tensor | None],
        masks: tuple,
        out: StepResult,
        clean_rng: ForkedRng | None = None,
        rng_origin: Tensor | None = None,
    ) -> None:
        self.graph = graph
        self.leaves = leaves
        self.masks = masks
        self.out = out
        # the clean pass's generator states live as long as the graph that reads them
        self.clean_rng = clean_rng
        # the default CUDA generator's state when the capture began (what the first replay draws from)
        self.rng_origin = rng_origin

    def replay(self, leaves: list[Any], masks: tuple) -> StepResult:
        for static, new in zip(self.leaves, leaves, strict=True):
            if static is not None:
                static.copy_(new, non_blocking=True)
        for static, new in zip(self.masks, masks, strict=True):
            if static is not None:
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        o = self.out
        return StepResult(
            loss=o.loss.clone(),
            logits=o.logits.clone(),
            deltas={k: v.clone() for k, v in o.deltas.items()},
            skipped_rows=o.skipped_rows.clone(),
            skipped_steps=o.skipped_steps.clone(),
            perturbation_survival={k: v.clone() for k, v in o.perturbation_survival.items()},
        )


class GraphedVillaStep:
    """:class:`VillaStep`, optionally followed by clipping and the optimizer step, replayed as one CUDA graph.

    Args:
        forward_fn, loss_fn, config, text_embedding, image_input, scaler, params, generator, kl_mask_fn: as for
            :class:`VillaStep`. ``generator`` (init_mag > 0) must be a CUDA generator to be captured.
        optimizer: optional optimizer stepped inside the graph; on CUDA it must be created with
            ``capturable=True`` (torch's AdamW also ``fused=True``; or villa_fast.train.optim.AdamW) and a
            tensor ``lr`` (a float lr would be frozen into the graph).
            With a scaler, ``scaler.step`` / ``scaler.update`` run inside the graph as well.
        max_grad_norm: optional clipping threshold (> 0) applied before the optimizer step; needs ``optimizer``.
        warmup: eager warm-up steps on a side stream before each capture (their effect is undone).
        model: optional module whose buffers (BatchNorm running statistics, counters) the warm-up before each
            capture must leave as they were; without it the parameters, gradients, optimizer and scaler state
            and the random streams are restored, but a module's buffers keep the warm-up's updates.
        max_graphs: most input signatures captured; the graphs share one memory pool for their intermediates
            but each keeps its static inputs and outputs, so further new signatures run eagerly (with a warning)
            instead of piling up graphs. Pad batches to a few fixed
            shapes (:class:`villa_fast.data.PadBuckets`; the trainer does with ``adv_graphed``).

    ``step(batch, txt_mask, img_mask, *, optimizer_step=True)`` returns a :class:`StepResult` whose tensors
    are copies (the graph's own outputs are overwritten by the next replay). One graph is captured per
    input signature (shapes, dtypes, non-tensor values of the batch, and whether the optimizer steps);
    non-tensor values in the batch are frozen into the graph. Gradients live in fixed ``.grad`` tensors:
    with ``optimizer_step=False`` (accumulation) the caller may zero them in place or set them to None.
    """

    def __init__(
        self,
        forward_fn: Callable[[Any], Tensor],
        loss_fn: Callable[[Tensor, Any], Tensor],
        config: AdversarialConfig,
        *,
        text_embedding: nn.Module | None = None,
        image_input: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        max_grad_norm: float | None = None,
        params: Iterable[Tensor] | None = None,
        generator: torch.Generator | None = None,
        warmup: int = 3,
        max_graphs: int = 16,
        kl_mask_fn: Callable[[Any], Tensor | None] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        # checked before VillaStep registers its hooks on the model
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (its buffers are restored), got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if max_grad_norm is not None:
            # 0 would zero every gradient before the optimizer step, a negative value flip their signs
            max_grad_norm = _real("max_grad_norm", max_grad_norm, positive=True)
            if optimizer is None:
                raise ValueError(
                    "max_grad_norm needs optimizer=: the clipping runs inside the step, just before the optimizer "
                    "step (without one, clip .grad yourself before stepping)"
                )
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        self.eager = VillaStep(
            forward_fn,
            loss_fn,
            config,
            text_embedding=text_embedding,
            image_input=image_input,
            scaler=scaler,
            params=params,
            generator=generator,
            kl_mask_fn=kl_mask_fn,
        )
        # the gradients live in fixed .grad tensors: each step adds to them directly (no second buffer)
        self.eager._grads_in_place = True
        # a graph holds the parameter list it was captured with: found once (at the first step), then kept
        self.eager._fixed_params = True
        self.optimizer = optimizer
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[Any, _Graph] = {}
        # one memory pool for every captured signature: a replay's intermediates are dead when it ends and its
        # outputs are cloned before anything else runs, so graphs replayed one at a time can share the pool
        # (memory ~ the largest step's, not the sum over shapes)
        self._pool: Any = None
        self._eager_keys: set = set()
        self._static_grads: list[Tensor] | None = None
        self._pending: Tensor | None = None
        self._said: set[str] = set()

    @property
    def config(self) -> AdversarialConfig:
        return self.eager.config

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.eager.scaler

    @property
    def graphed(self) -> bool:
        """Whether at least one step has been captured."""
        return bool(self._graphs)

    def stats(self) -> dict[str, int]:
        """``graphs``: input signatures captured; ``eager_signatures``: those run eagerly (past ``max_graphs``, or
        whose capture failed); 0 and 0 where the step runs eagerly altogether (no CUDA)."""
        return {"graphs": len(self._graphs), "eager_signatures": len(self._eager_keys)}

    def remove_hooks(self) -> None:
        self.eager.remove_hooks()

    def update_scaler(self, skipped_steps: Tensor | None = None) -> None:
        """:meth:`VillaStep.update_scaler`, for a caller that steps the optimizer outside the graph."""
        self.eager.update_scaler(skipped_steps)

    def skip_if_left_out(self, optimizer: torch.optim.Optimizer, skipped_steps: Tensor | int | None) -> None:
        """:meth:`VillaStep.skip_if_left_out`, for a caller that steps the optimizer outside the graph."""
        self.eager.skip_if_left_out(optimizer, skipped_steps)

    # ------------------------------------------------------------------------------------------- step
    def step(
        self,
        batch: Any,
        txt_mask: Tensor | None = None,
        img_mask: Tensor | None = None,
        *,
        optimizer_step: bool = True,
    ) -> StepResult:
        self.eager._check_call("GraphedVillaStep.step", txt_mask, img_mask)
        do_opt = bool(optimizer_step) and self.optimizer is not None
        why = self._why_eager(batch)
        if why:
            self._say_eager(why)
            return self._full(batch, txt_mask, img_mask, do_opt)
        leaves, spec = pytree.tree_flatten(batch)
        odd = next((x for x in leaves if not isinstance(x, (Tensor, *_PLAIN))), None)
        if odd is not None:
            # a graph reads its inputs from fixed buffers that only tensor leaves are copied into; an object that
            # pytree cannot open (a dataclass, a custom batch class) would be frozen into the graph, data and all
            self._say_eager(
                f"the batch holds a {type(odd).__name__}, which torch.utils._pytree cannot open: its contents "
                "cannot be fed to a CUDA graph (pass dicts, lists or tuples of tensors, or register the type "
                "with torch.utils._pytree)"
            )
            return self._full(batch, txt_mask, img_mask, do_opt)
        dev = self.eager._injector.device()
        host = next(
            (
                x
                for x in (*leaves, txt_mask, img_mask)
                if isinstance(x, Tensor) and dev is not None and x.device.type != dev.type
            ),
            None,
        )
        if host is not None:
            # a graph replays device work only: a host tensor's new values reach a host buffer, and anything the
            # forward derived from them on the host (lengths for pack_padded_sequence, .item(), .tolist()) would
            # be the capture's, silently
            self._say_eager(
                f"the batch holds a {host.device.type} tensor of shape {tuple(host.shape)} beside a model on "
                f"{dev.type}: a CUDA graph cannot feed it new values (move every tensor of the batch to the GPU)"
            )
            return self._full(batch, txt_mask, img_mask, do_opt)
        key = self._key(leaves, spec, txt_mask, img_mask, do_opt)
        entry = self._graphs.get(key)
        if entry is None:
            if key in self._eager_keys:
                return self._full(batch, txt_mask, img_mask, do_opt)
            if len(self._graphs) >= self.max_graphs:
                self._eager_keys.add(key)
                self._say_eager(
                    f"more than max_graphs={self.max_graphs} input shapes (each graph keeps its own buffers): new "
                    "shapes run eagerly; pad batches to a few fixed shapes (villa_fast.data.PadBuckets)"
                )
                return self._full(batch, txt_mask, img_mask, do_opt)
            try:
                entry = self._capture(leaves, spec, txt_mask, img_mask, do_opt)
            except Exception as exc:  # fall back for this signature, keep training
                self._eager_keys.add(key)
                if self.scaler is not None and self.scaler.is_enabled():
                    # a capture that stopped between unscale_/step and update leaves the scaler mid-iteration
                    with contextlib.suppress(AssertionError):
                        self.scaler.update(new_scale=float(self.scaler.get_scale()))
                self._say_eager(f"CUDA graph capture failed ({type(exc).__name__}: {exc})")
                return self._full(batch, txt_mask, img_mask, do_opt)
            self._graphs[key] = entry
        self._attach_static_grads()
        return entry.replay(leaves, (txt_mask, img_mask))

    # -------------------------------------------------------------------------------------- internals
    def _say_eager(self, why: str) -> None:
        if why in self._said:
            return
        self._said.add(why)
        warnings.warn(f"GraphedVillaStep runs eagerly: {why}", RuntimeWarning, stacklevel=3)
        log.info("GraphedVillaStep runs eagerly: %s", why)

    def _why_eager(self, batch: Any) -> str:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if self.config.clean_backward == "recompute" and not graphsafe_rng_available():
            return (
                "clean_backward='recompute' needs torch.Generator.graphsafe_set_state (torch >= 2.5) to replay "
                "the clean pass's dropout masks inside a graph"
            )
        dev = self.eager._injector.device()
        if dev is None:
            leaves = [t for t in pytree.tree_leaves(batch) if isinstance(t, Tensor)]
            dev = leaves[0].device if leaves else None
        if dev is None or dev.type != "cuda":
            return "the model is not on a CUDA device"
        return ""

    @staticmethod
    def _key(leaves: list[Any], spec: Any, txt_mask: Tensor | None, img_mask: Tensor | None, do_opt: bool) -> Any:
        def sig(x: Any) -> Any:
            if isinstance(x, Tensor):
                return ("T", tuple(x.shape), x.dtype, x.device, x.requires_grad)
            try:
                hash(x)
            except TypeError:
                return ("R", repr(x))
            return ("V", type(x).__name__, x)

        return (str(spec), tuple(sig(x) for x in leaves), sig(txt_mask), sig(img_mask), do_opt)

    def _opt_params(self) -> list[Tensor]:
        if self.optimizer is None:
            return list(self.eager.params or [])
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _full(
        self, batch: Any, txt_mask: Tensor | None, img_mask: Tensor | None, do_opt: bool, *, keep_grads: bool = False
    ) -> StepResult:
        """The whole step, eager: adversarial step, then (optionally) unscale, clip, optimizer step, zero."""
        result = self.eager.step(batch, txt_mask, img_mask)
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        pending = None
        if scaler is not None and self.optimizer is not None:
            # the left-out steps of every micro-batch since the last optimizer step back the scale off
            pending = self._pending_skipped(result.skipped_steps.device)
            pending.add_(result.skipped_steps)
        if not do_opt:
            return result
        opt = self.optimizer
        params = self._opt_params()
        if self.max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            clip_grad_norm_capturable_(params, self.max_grad_norm)
        if scaler is not None:
            # a step left out as non-finite skips this optimizer step, as an overflow in .grad would
            self.eager.skip_if_left_out(opt, pending)
            scaler.step(opt)
            scaler.update()
            pending.zero_()
        else:
            opt.step()
        if keep_grads or self._static_grads is not None:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)  # in place: a captured graph keeps writing the same tensors
        else:
            opt.zero_grad(set_to_none=True)
        return result

    def _pending_skipped(self, device: torch.device) -> Tensor:
        """Steps left out since the last optimizer step (device counter, allocated outside any capture)."""
        if self._pending is None:
            self._pending = torch.zeros((), dtype=torch.int64, device=device)
        return self._pending

    def _grad_params(self) -> list[Tensor]:
        return list(self.eager.params or [])

    def _all_params(self) -> list[Tensor]:
        seen, out = set(), []
        for p in [*(self.eager.params or []), *self._opt_params()]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _attach_static_grads(self) -> None:
        """Give every parameter its fixed ``.grad`` tensor again if the caller dropped or replaced it."""
        if self._static_grads is None:
            return
        dropped = []
        for p, g in zip(self._grad_params(), self._static_grads, strict=True):
            if p.grad is g:
                continue
            if p.grad is None:
                dropped.append(g)
            else:
                g.copy_(p.grad)
            p.grad = g
        if dropped:
            torch._foreach_zero_(dropped)  # one multi-tensor launch after zero_grad(set_to_none=True)

    def _snapshot(self) -> dict[str, Any]:
        params = self._all_params()
        snap: dict[str, Any] = {
            "params": [p.detach().clone() for p in params],
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        }
        if self.optimizer is not None:
            snap["opt"] = {
                id(p): {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
                for p, st in self.optimizer.state.items()
            }
        if self.scaler is not None and self.scaler.is_enabled():
            snap["scaler"] = self.scaler.state_dict()
        if self.eager.generator is not None:
            snap["gen"] = self.eager.generator.get_state()
        device = params[0].device if params else None
        if device is not None and device.type == "cuda":
            # the warm-up's dropout draws from the default generator: undone, so the training run's random
            # stream does not depend on when a shape is first met (a resumed run captures at other steps)
            snap["cuda_rng"] = (device, torch.cuda.get_rng_state(device))
        if self._pending is not None:
            snap["pending"] = self._pending.clone()
        return snap

    def _snapshot_model(self) -> dict[str, Any]:
        """The model's buffers (when ``model`` was given) and the default CUDA generator's state."""
        snap: dict[str, Any] = {}
        if self.model is not None:
            snap["buffers"] = [(b, b.detach().clone()) for b in self.model.buffers()]
        device = self.eager._injector.device()
        if device is not None and device.type == "cuda":
            snap["cuda_rng"] = (device, torch.cuda.get_rng_state(device))
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        """Undo the warm-up in place (tensor identities are kept: the graph will use these tensors)."""
        params = self._all_params()
        with torch.no_grad():
            for p, v, g in zip(params, snap["params"], snap["grads"], strict=True):
                p.copy_(v)
                if g is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            # the parameters the step differentiates get fixed gradient tensors (zero = no gradient yet);
            # the others keep None, so the optimizer skips them exactly as it does eagerly
            for p in self._grad_params():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if self.optimizer is not None:
                old_all = snap["opt"]
                for p, st in self.optimizer.state.items():
                    old = old_all.get(id(p), {})
                    for k, v in st.items():
                        if isinstance(v, Tensor):
                            if k in old:
                                v.copy_(old[k])
                            else:
                                v.zero_()  # state born in the warm-up: fresh Adam-style state is all zeros
                        elif k in old:
                            st[k] = old[k]
        if "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        if "gen" in snap:
            self.eager.generator.set_state(snap["gen"])
        if "cuda_rng" in snap:
            torch.cuda.set_rng_state(snap["cuda_rng"][1], snap["cuda_rng"][0])
        with torch.no_grad():
            for b, v in snap.get("buffers", ()):
                b.copy_(v)
        if "pending" in snap:
            self._pending.copy_(snap["pending"])
        elif self._pending is not None:
            self._pending.zero_()  # born in the warm-up

    def _check_optimizer(self) -> None:
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            if not group.get("capturable", False):
                raise RuntimeError(
                    "the optimizer must be created with capturable=True (torch.optim.AdamW also with fused=True)"
                )
            if not isinstance(group["lr"], Tensor):
                self._say_eager_lr()
                break

    def _say_eager_lr(self) -> None:
        msg = "the optimizer's lr is a float: it is frozen into the CUDA graph; pass lr=torch.tensor(...)"
        if msg not in self._said:
            self._said.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _capture(
        self, leaves: list[Any], spec: Any, txt_mask: Tensor | None, img_mask: Tensor | None, do_opt: bool
    ) -> _Graph:
        if do_opt:
            self._check_optimizer()
        # the buffers and the default CUDA generator before anything runs: discovering the parameters is a
        # clean forward too (dropout draws, BatchNorm statistics), undone with the warm-up
        before = self._snapshot_model()
        if self.eager.params is None:
            self.eager.discover_params(pytree.tree_unflatten(leaves, spec))
        static_leaves = [x.detach().clone() if isinstance(x, Tensor) else None for x in leaves]
        static_batch = pytree.tree_unflatten(
            [s if s is not None else x for s, x in zip(static_leaves, leaves, strict=True)], spec
        )
        static_masks = tuple(None if m is None else m.detach().clone() for m in (txt_mask, img_mask))

        self._attach_static_grads()
        if self.scaler is not None and self.scaler.is_enabled() and self.optimizer is not None:
            self._pending_skipped(self._grad_params()[0].device)  # a tensor of its own, not the graph pool's
        snap = {**self._snapshot(), **before}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._full(static_batch, *static_masks, do_opt, keep_grads=True)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            self._restore(snap)
        params = self._grad_params()
        if self._static_grads is None:
            self._static_grads = [p.grad for p in params]
        elif len(self._static_grads) != len(params):
            raise RuntimeError("the parameter set changed after the first capture")
        self._attach_static_grads()
        torch.cuda.synchronize()

        graph = torch.cuda.CUDAGraph()
        gen = self.eager.generator
        if gen is not None and gen.device.type == "cuda" and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(gen)
        device = self._grad_params()[0].device
        origin = torch.cuda.get_rng_state(device)
        clean_rng = None
        if self.config.clean_backward == "recompute":
            clean_rng = ForkedRng(device)
            clean_rng.register(graph)
        self.eager._clean_rng = clean_rng
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._full(static_batch, *static_masks, do_opt, keep_grads=True)
        finally:
            self.eager._clean_rng = None
        return _Graph(graph, static_leaves, static_masks, out, clean_rng, origin)
