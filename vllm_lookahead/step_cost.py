"""What a step costs, learned online, and where verifying one more draft token stops paying.

`CostModel` fits step time ≈ a + b·rows + c·tokens (wall time between steps against the rows and
the tokens verified) by a ridge regression on exponentially decayed statistics, pulled towards a
prior *shape* (the relative sizes of a, b and c) scaled to the observed step times. Steps vary
little in rows and tokens, and on a busy machine their times are noisy, so an unregularised fit
wanders far (negative costs, a step's worth per token); the prior keeps it sane until the data
speak clearly, and the scale keeps the prior meaningful for any model size and device.

The cut (`chain.cut`) then keeps, over the whole batch, exactly the draft tokens whose expected
acceptance pays for their verification: adding a token of cumulative acceptance probability q to
a step that emits N tokens in T seconds raises throughput iff q > (marginal cost of a token) ·
N / T; tokens are taken in order of q, so the threshold rises as the batch's load grows and
drafting stops where nothing pays.

The arithmetic is `jitable`: the reference drafter runs it as Python on the model's record, the
compiled step runs it compiled on the same record layout, and both fit bit for bit alike.
"""

from __future__ import annotations

import numpy as np

from vllm_lookahead.compiled import jitable

CPU_STEP_COST_PRIOR = (0.04, 0.0005, 0.003)
"""Seconds per step, per row and per verified token: a small model on a few CPU cores, where the
forward is compute-bound and a draft token costs at least what a row does (the shape of a fit of
SmolLM2's step times, `python -m benchmarks.step_surface`). Only the shape counts (the fit scales
it to the observed steps), and it is only a starting point; the model follows what the steps
actually take."""

COST_STATE = np.dtype([
    ("xx", np.float64, (3, 3)),  # decayed sums of x·xᵀ, x = (1, rows, tokens)
    ("xy", np.float64, (3,)),  # decayed sums of x·seconds
    ("scale_num", np.float64),  # decayed sums that scale the prior shape to the observed times
    ("scale_den", np.float64),
    ("theta", np.float64, (3,)),  # the fit (a, b, c)
    ("prior_shape", np.float64, (3,)),  # the relative sizes of (a, b, c) by the prior
    ("decay", np.float64),
    ("prior_steps", np.float64),  # the prior weighs as much as this many typical steps
    ("observations", np.float64),
])


class CostModel:
    """Step time ≈ a + b·rows + c·tokens, fitted online; `token_cost` (c) is what one more
    verified token costs. `cells` is the one-entry record array the compiled step works on."""

    def __init__(self, prior: tuple[float, float, float], half_life: float = 200.0,
                 prior_steps: float = 20.0) -> None:
        self.cells = np.zeros(1, dtype=COST_STATE)
        self.state = self.cells.view(np.recarray)[0]
        self.state.prior_shape[:] = prior
        self.state.theta[:] = prior
        self.state.decay = 0.5 ** (1 / half_life)
        self.state.prior_steps = prior_steps

    @property
    def theta(self) -> np.ndarray:
        """(a, b, c), a view: writing it sets the fit."""
        return self.cells["theta"][0]

    @property
    def observations(self) -> int:
        return int(self.state.observations)

    @property
    def token_cost(self) -> float:
        return float(self.state.theta[2])

    def predict(self, rows: int, tokens: int) -> float:
        return float(predict(self.state, float(rows), float(tokens)))

    def reach_floor(self, rows: int) -> float:
        """Below this reach no draft token of `rows` chains survives the cut."""
        return float(reach_floor(self.state, float(rows)))

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        observe(self.state, float(rows), float(tokens), float(seconds))


@jitable
def predict(st, rows, tokens):  # type: ignore[no-untyped-def]
    return max(st.theta[0] + st.theta[1] * rows + st.theta[2] * tokens, 1e-9)


@jitable
def reach_floor(st, rows):  # type: ignore[no-untyped-def]
    """The reach below which the cut keeps no draft token of a batch of `rows` chains, less a
    margin for rounding, so that composing can stop there. The cut keeps a token of reach q only
    while q * step > c * expected, and every token kept before it has reach >= q; after k of
    them, q * (S0 + c * k) > c * (rows + k * q), so q * S0 > c * rows (S0: the predicted step
    without drafts, c: the cost of a verified token). 0 if c is not positive."""
    c = st.theta[2]
    if c <= 0.0:
        return 0.0
    return c * rows / predict(st, rows, rows) * (1.0 - 1e-6)


@jitable
def observe(st, rows, tokens, seconds):  # type: ignore[no-untyped-def]
    """One step's time: update the decayed statistics and refit."""
    # One pause (a client gone quiet, a GC, a busy machine) must not teach the model that
    # tokens are dear.
    if st.observations >= 10 and seconds > 3 * predict(st, rows, tokens):
        return
    d = st.decay
    x = (1.0, rows, tokens)
    for i in range(3):
        for j in range(3):
            st.xx[i, j] = d * st.xx[i, j] + x[i] * x[j]
        st.xy[i] = d * st.xy[i] + x[i] * seconds
    shaped = st.prior_shape[0] + rows * st.prior_shape[1] + tokens * st.prior_shape[2]
    st.scale_num = d * st.scale_num + seconds * shaped
    st.scale_den = d * st.scale_den + shaped * shaped
    st.observations += 1.0
    _refit(st)


@jitable
def _refit(st):  # type: ignore[no-untyped-def]
    """Ridge regression towards the prior shape scaled to the observed times."""
    scale = st.scale_num / st.scale_den
    xx00 = st.xx[0, 0]
    # As strong as `prior_steps` typical steps, per parameter.
    weight = st.prior_steps * min(1.0, xx00)
    a = np.empty((3, 4))
    for i in range(3):
        prior_i = st.prior_shape[i] * scale
        ridge = weight * (st.xx[i, i] / max(xx00, 1e-9))
        for j in range(3):
            a[i, j] = st.xx[i, j]
        a[i, i] += ridge
        a[i, 3] = st.xy[i] + ridge * prior_i
    # Gaussian elimination: the matrix is symmetric positive definite, no pivoting needed.
    for i in range(3):
        for r in range(i + 1, 3):
            f = a[r, i] / a[i, i]
            for j in range(i, 4):
                a[r, j] -= f * a[i, j]
    theta = np.empty(3)
    for i in range(2, -1, -1):
        acc = a[i, 3]
        for j in range(i + 1, 3):
            acc -= a[i, j] * theta[j]
        theta[i] = acc / a[i, i]
    # Costs are positive, and a verified token costs no more than two rows do by the prior
    # (a row is a token plus its sampling and bookkeeping).
    for i in range(3):
        st.theta[i] = max(theta[i], 0.02 * st.prior_shape[i] * scale)
    cap = 2 * (st.prior_shape[1] * scale + st.prior_shape[2] * scale)
    st.theta[2] = min(st.theta[2], cap)
