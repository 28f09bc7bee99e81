"""Hadamard matrices of any order lowbit can build, generated at run time (never stored): Sylvester for powers
of two, Paley I (order q + 1, prime q = 3 mod 4) and Paley II (order 2(q + 1), prime q = 1 mod 4) for the
other factor, and Kronecker products of those (FORMATS.md 6.5): 576 = 36 x 16, 896 = 28 x 32, 4864 = 76 x 64.
Where no order fits, a seeded random orthogonal matrix stands in (any orthogonal Q keeps a rotation exact;
a Hadamard one spreads outliers best)."""

from __future__ import annotations

import functools
import math

import torch

MAX_PALEY_PRIME = 4099  # largest q tried: Paley orders up to 8200


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_kind(order: int) -> tuple[str, int] | None:
    """("I", q) or ("II", q) when a Paley construction over the prime q gives this order."""
    q = order - 1
    if q <= MAX_PALEY_PRIME and q % 4 == 3 and _is_prime(q):
        return "I", q
    if order % 2 == 0:
        q = order // 2 - 1
        if q <= MAX_PALEY_PRIME and q % 4 == 1 and _is_prime(q):
            return "II", q
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q): +1 for a nonzero square, -1 for a non-square, 0 on the diagonal."""
    squares = torch.zeros(q, dtype=torch.float64)
    squares[torch.tensor(sorted({(x * x) % q for x in range(1, q)}))] = 1
    chi = 2 * squares - 1
    chi[0] = 0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(kind: str, q: int) -> torch.Tensor:
    jac = _jacobsthal(q)
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 1:] = jac
    if kind == "I":  # skew: H = S + I
        s[1:, 0] = -1
        return s + torch.eye(n, dtype=torch.float64)
    s[1:, 0] = 1  # symmetric conference matrix
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h, base)
    return h


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=64)
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """The orders whose Kronecker product builds a Hadamard matrix of order n (the power of two last), or
    None. The smallest Paley factor is preferred, then a product of two Paley orders (144 = 12 x 12)."""
    if n < 1:
        return None
    if _power_of_two(n):
        return (n,)
    for m in range(3, n + 1):  # m = n / 2^k, smallest first
        if n % m or not _power_of_two(n // m):
            continue
        if _paley_kind(m):
            return (m, n // m)
    for m in range(3, n + 1):
        if n % m or not _power_of_two(n // m):
            continue
        for a in range(3, math.isqrt(m) + 1):
            if m % a == 0 and _paley_kind(a) and _paley_kind(m // a):
                return (a, m // a, n // m)
    return None


def _factor_matrix(f: int) -> torch.Tensor:
    return _sylvester(f) if _power_of_two(f) else _paley(*_paley_kind(f))


def _split_power_of_two(factors: tuple[int, ...], largest: int = 256) -> list[int]:
    """The same orders with each power of two cut into Sylvester pieces of at most `largest` (H_2^k is the
    Kronecker product of smaller H_2^j), so a structured product never builds a big dense factor."""
    out = []
    for f in factors:
        while _power_of_two(f) and f > largest:
            out.append(largest)
            f //= largest
        if f > 1:
            out.append(f)
    return out or [1]


def hadamard(n: int) -> torch.Tensor | None:
    """A +-1 matrix H of order n with H H^T = n I (float64, dense), or None when no construction here
    reaches n."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        h = torch.kron(h, _factor_matrix(f))
    return h


def describe(n: int) -> str:
    """How the order-n rotation is built, for logs and the summary: '36x16 Hadamard' or 'random orthogonal'."""
    factors = hadamard_factors(n)
    if factors is None:
        return "random orthogonal (no Hadamard order)"
    return "x".join(str(f) for f in factors if f > 1 or len(factors) == 1) + " Hadamard"


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    g = torch.randn(n, n, dtype=torch.float64, generator=generator, device="cpu")  # the same draw on every device
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(torch.get_default_device())


class Rotation:
    """An orthogonal n x n matrix Q applied to row vectors without forming it: x Q = (x H) * signs / sqrt(n)
    with H a Kronecker product of small Hadamard factors (one einsum per factor), optionally followed by a
    reflection; or a dense random orthogonal matrix where no Hadamard order fits."""

    def __init__(self, n: int, seed: int | None = 0, keep_mean: bool = False):
        self.n, self.seed, self.keep_mean = n, seed, keep_mean
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        factors = hadamard_factors(n)
        self.kind = describe(n)
        self.dense = None if factors is not None else random_orthogonal(n, generator)
        self.factors = [] if factors is None else [_factor_matrix(f) for f in _split_power_of_two(factors)]
        self.signs = torch.ones(n, dtype=torch.float64)
        if factors is not None and seed is not None:
            draw = torch.randint(0, 2, (n,), generator=generator, device="cpu")  # the same signs on every device
            self.signs = draw.to(torch.get_default_device()).double() * 2 - 1
        self.reflect = None  # w: Q <- Q (I - 2 w w^T), sending the ones direction to itself
        if keep_mean:
            u = torch.full((1, n), 1 / math.sqrt(n), dtype=torch.float64)
            w = (self._plain(u) - u)[0]  # u Q - u
            if torch.linalg.vector_norm(w) > 1e-12:
                self.reflect = w / torch.linalg.vector_norm(w)

    def _as(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == like.dtype and t.device == like.device else t.to(like.device, like.dtype)

    def _kron(self, x: torch.Tensor) -> torch.Tensor:
        """x H, one small factor per axis of x's last dimension reshaped to the factors' orders."""
        shape = x.shape
        y = x.reshape(-1, *(f.shape[0] for f in self.factors))
        for axis, f in enumerate(self.factors, start=1):
            y = torch.movedim(torch.movedim(y, axis, -1) @ self._as(f, x), -1, axis)
        return y.reshape(shape)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        """x Q without the reflection, in x's dtype (float64 for weights, the activations' dtype for an
        online rotation)."""
        if self.dense is not None:
            return x @ self._as(self.dense, x)
        return self._kron(x) * self._as(self.signs, x) / math.sqrt(self.n)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x Q over the last dimension, in x's dtype. (x Q^T, where needed, is right() of the transpose:
        Q^T W = (W^T Q)^T.)"""
        y = self._plain(x)
        if self.reflect is not None:
            w = self._as(self.reflect, x)
            y = y - 2 * (y @ w)[..., None] * w
        return y

    def matrix(self) -> torch.Tensor:
        """Q itself (dense, float64): for tests and for exporters that write it as a MatMul."""
        return self.right(torch.eye(self.n, dtype=torch.float64))
