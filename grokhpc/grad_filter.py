"""Grokfast (Lee et al. 2024): a low-pass filter of each gradient, amplified and added back
before the optimiser step (``RunConfig.grad_filter``), for R runs stacked on a leading axis.

* ``ema``: ``h <- alpha h + (1 - alpha) g; g <- g + lamb h``, h starting at the first gradient.
  As the authors' ``gradfilter_ema`` does, the first step sets h to the first gradient and
  then applies the update too (h becomes ``alpha g + (1 - alpha) g``, g up to rounding).
* ``ma``: the last ``grokfast_window`` raw gradients are kept; once the window is full,
  ``g <- g + lamb * mean(window)``, the window including this step's gradient (the authors'
  ``gradfilter_ma``, warmup on: before the window is full the gradient is left as it is).

Per-run ``alpha`` and ``lamb`` are float32 columns broadcast along the run axis, so one run's
values never reach another's and a run computes the same elementwise operations alone or
packed. The state -- h, or the window and the number of gradients seen -- is each run's own
and goes into its state.pt (``state`` / ``from_states``), so a resume is bit-identical. The
MA window holds ``grokfast_window`` copies of the weights' size per run.
"""

from __future__ import annotations


def _col(values, like):
    import torch

    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _b(t, like):
    return t.view((-1,) + (1,) * (like.dim() - 1))


class StackedGradFilter:
    """The filter of R runs over stacked weights ``params`` (each (R, *shape)); ``states``:
    each run's saved state (None: fresh)."""

    def __init__(self, cfgs: list, params: list, states: list):
        import torch

        self.kind = cfgs[0].grad_filter
        self.window = cfgs[0].grokfast_window
        like = params[0]
        self.alpha = _col([c.grokfast_alpha for c in cfgs], like)
        self.one_minus = _col([1 - c.grokfast_alpha for c in cfgs], like)
        self.lamb = _col([c.grokfast_lamb for c in cfgs], like)
        counts = {0 if s is None else int(s["count"]) for s in states}
        if len(counts) != 1:
            raise RuntimeError(f"grad_filter: runs at different filter steps {sorted(counts)}")
        self.count = counts.pop()   # gradients seen (the same in every run of a group)
        key = "h" if self.kind == "ema" else "window"
        self.bufs = []
        for i, p in enumerate(params):
            shape = p.shape[1:] if self.kind == "ema" else (self.window,) + tuple(p.shape[1:])
            self.bufs.append(torch.stack([
                torch.zeros(shape, dtype=p.dtype) if s is None else s[key][i]
                for s in states]).to(p.device))

    def apply(self, params: list) -> None:
        """Filter each ``p.grad`` of ``params`` in place (one optimiser step's gradients)."""
        import torch

        with torch.no_grad():
            for p, buf in zip(params, self.bufs):
                if self.kind == "ema":
                    self._ema(p.grad, buf)
                else:
                    self._ma(p.grad, buf)
        self.count += 1

    def _ema(self, g, h) -> None:
        if self.count == 0:
            h.copy_(g)
        h.copy_(h * _b(self.alpha, h) + g * _b(self.one_minus, g))
        g.add_(h * _b(self.lamb, h))

    def _ma(self, g, window) -> None:
        window[:, self.count % self.window].copy_(g)
        if self.count + 1 >= self.window:
            g.add_(window.sum(dim=1) / self.window * _b(self.lamb, g))

    def state(self, r: int) -> dict:
        """Run ``r``'s filter state, for its state.pt (CPU copies)."""
        key = "h" if self.kind == "ema" else "window"
        return {"count": self.count, key: [b[r].detach().cpu().clone() for b in self.bufs]}


def stacked_filter(trainers: list, params: list):
    """The group's filter over the stacked trainable weights, from each run's saved filter
    state (``Trainer.filter_state``); None when the group's runs filter nothing."""
    cfgs = [t.cfg for t in trainers]
    if cfgs[0].grad_filter == "none":
        return None
    return StackedGradFilter(cfgs, params, [t.filter_state for t in trainers])
