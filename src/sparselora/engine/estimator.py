"""The SVD sparsity estimator: rank-r factors A (in, r), B (r, out) with x A B ≈ x W^T.

Two kinds, both training-free:
- `svd` (the paper): thin SVD of W^T, A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T. Best for inputs
  spread evenly over all directions.
- `whitened_svd`: the rank-r minimiser of E||x (W^T - A B)||^2 over real inputs x. With the
  input covariance C = L L^T (Cholesky), that is A B = L^-T [L^T W^T]_r; it spends the rank on
  the directions the inputs actually occupy.

Factors are float32 whatever the model dtype (a low-precision estimator makes scores tie).
Files are safetensors with keys "{layer}.{proj}.w1" (in, r) and "{layer}.{proj}.w2" (r, out),
the layout the paper's authors publish, plus metadata naming the model fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

FORMAT = "sparselora-estimator"
Key = tuple[int, str]  # (layer index, projection name)
FFN_ESTIMATED = ("gate_proj", "up_proj")  # down_proj reuses their channels
ATTN_ESTIMATED = ("q_proj", "k_proj", "v_proj")  # o_proj reuses v_proj's channels
ESTIMATED = FFN_ESTIMATED + ATTN_ESTIMATED


class EstimatorMismatchError(ValueError):
    """An estimator file does not belong to this model (fingerprint, shapes or kind differ)."""


def weights_fingerprint(weights: Mapping[Key, torch.Tensor]) -> str:
    """A short hash of the frozen projection weights: names, shapes and 4096 strided values each.

    Cheap enough for an 8B model (it reads a few thousand values per matrix, not every byte)
    and changes whenever a checkpoint, a merge or a fine-tune changes the weights.
    """
    digest = hashlib.sha256()
    for layer, proj in sorted(weights):  # one weight at a time: a Mapping may build them lazily
        weight = weights[(layer, proj)]
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{layer}.{proj}:{tuple(weight.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def top_singular(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of `matrix` (m, n): U (m, r), S (r,), V^T (r, n), float64.

    Uses the eigendecomposition of the smaller Gram matrix (min(m, n) square) instead of a full
    SVD: on CPU this is 10-50x faster for the projection shapes of LLMs, and in float64 the
    top singular vectors it returns match `torch.linalg.svd` to ~1e-10.
    """
    m = matrix.double()
    tall = m.shape[0] >= m.shape[1]
    gram = m.T @ m if tall else m @ m.T  # (small, small)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    order = eigenvalues.flip(0)[:rank].clamp_min(0.0)
    vectors = eigenvectors.flip(1)[:, :rank]
    s = order.sqrt()
    inv = torch.where(s > s.max() * 1e-12, 1.0 / s, torch.zeros_like(s))
    if tall:  # vectors are V (n, r); U = M V / S
        return (m @ vectors) * inv, s, vectors.T
    return vectors, s, (vectors.T @ m) * inv.unsqueeze(1)  # vectors are U (m, r)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-r factors of W^T. weight: (out, in) -> A (in, r), B (r, out), float32."""
    u, s, vh = top_singular(weight.detach().T, rank)
    root = s.sqrt()
    return (u * root).float().contiguous(), (root.unsqueeze(1) * vh).float().contiguous()


def whitened_svd_factors(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors minimising E||x(W^T - A B)||^2 for inputs of the given covariance.

    weight: (out, in); covariance: (in, in) = E[x^T x]. Returns A (in, r), B (r, out), float32.
    `damping` adds damping * mean(diag C) to the diagonal so C is safely positive definite.
    """
    w_t = weight.detach().double().T  # (in, out)
    cov = covariance.to(w_t.device, torch.float64)
    ridge = damping * cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    chol = torch.linalg.cholesky(cov + ridge * eye)  # C = L L^T
    u, s, vh = top_singular(chol.T @ w_t, rank)  # of L^T W^T
    root = s.sqrt()
    a = torch.linalg.solve_triangular(chol.T, u * root, upper=True)  # L^-T U_r sqrt(S)
    return a.float().contiguous(), (root.unsqueeze(1) * vh).float().contiguous()


class CovarianceCollector:
    """Accumulates E[x^T x] of block inputs over real tokens, for the whitened estimator.

    Keys are (layer, "mlp") for the FFN input and (layer, "attn") for the attention input.
    Memory: one (H, H) float32 matrix per key.
    """

    def __init__(self, keys: Iterable[Key]) -> None:
        """keys: the (layer, projection) pairs whose inputs are collected."""
        self.keys = {(layer, _input_kind(proj)) for layer, proj in keys}
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens: dict[tuple[int, str], int] = {}

    @torch.no_grad()
    def add(self, layer: int, kind: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        """x: (B, L, H) input of `layer`'s "mlp" or "attn"; mask: (B, L) real tokens."""
        if (layer, kind) not in self.keys:
            return
        tokens = x.detach()[mask].float()  # (T, H)
        gram = tokens.T @ tokens
        key = (layer, kind)
        self.sums[key] = gram if key not in self.sums else self.sums[key] + gram
        self.tokens[key] = self.tokens.get(key, 0) + tokens.shape[0]

    def min_tokens(self) -> int:
        return min((self.tokens.get(k, 0) for k in self.keys), default=0)

    def covariances(self, keys: Iterable[Key]) -> dict[Key, torch.Tensor]:
        """Per (layer, projection) covariance: q/k/v read the attention input, gate/up the FFN's."""
        out = {}
        for layer, proj in keys:
            kind = _input_kind(proj)
            out[(layer, proj)] = self.sums[(layer, kind)] / max(1, self.tokens[(layer, kind)])
        return out


def _input_kind(proj: str) -> str:
    return "mlp" if proj in FFN_ESTIMATED else "attn"


class Estimator:
    """Low-rank factors for a set of (layer, projection) pairs of one model."""

    def __init__(
        self,
        factors: dict[Key, tuple[torch.Tensor, torch.Tensor]],
        kind: str,
        rank: int,
        fingerprint: str | None,
        model_name: str | None = None,
    ) -> None:
        self.factors = factors
        self.kind = kind
        self.rank = rank
        self.fingerprint = fingerprint
        self.model_name = model_name

    def __contains__(self, key: Key) -> bool:
        return key in self.factors

    def project(self, layer: int, proj: str, x: torch.Tensor) -> torch.Tensor:
        """x A B in float32. x: (..., in) -> (..., out)."""
        a, b = self.factors[(layer, proj)]
        return (x.to(a.dtype) @ a) @ b

    def to(self, device: torch.device | str) -> Estimator:
        self.factors = {k: (a.to(device), b.to(device)) for k, (a, b) in self.factors.items()}
        return self

    # -- building ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        weights: Mapping[Key, torch.Tensor],
        kind: str,
        rank: int,
        covariances: Mapping[Key, torch.Tensor] | None = None,
        damping: float = 1e-2,
        model_name: str | None = None,
        fingerprint: str | None = None,
    ) -> Estimator:
        """Factor every weight. whitened_svd needs `covariances[(layer, proj)]` for each key."""
        if kind == "whitened_svd" and covariances is None:
            raise ValueError("estimator 'whitened_svd' needs input covariances (calibration data)")
        factors = {}
        for key in tqdm(sorted(weights), desc="estimator", delay=2.0, leave=False):
            weight = weights[key]  # one at a time: a Mapping may build them lazily
            with torch.no_grad():
                full_rank = min(rank, *weight.shape)  # a thin matrix caps the rank
                if kind == "svd":
                    factors[key] = svd_factors(weight, full_rank)
                else:
                    factors[key] = whitened_svd_factors(
                        weight, covariances[key], full_rank, damping
                    )
        return cls(factors, kind, rank, fingerprint or weights_fingerprint(weights), model_name)

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the factors atomically as safetensors with metadata."""
        from sparselora.version import __version__

        tensors = {}
        for (layer, proj), (a, b) in self.factors.items():
            tensors[f"{layer}.{proj}.w1"] = a.detach().cpu().contiguous()
            tensors[f"{layer}.{proj}.w2"] = b.detach().cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "kind": self.kind,
            "rank": str(self.rank),
            "fingerprint": self.fingerprint or "",
            "model": self.model_name or "",
            "dtype": "float32",
            "version": __version__,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        fingerprint: str | None = None,
        device: str | torch.device = "cpu",
    ) -> Estimator:
        """Read factors. With `fingerprint`, refuse a file made for other weights.

        Files without our metadata (for example the authors' published estimators) load with
        kind 'svd'; their shapes are checked against the model when applied.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        stored = metadata.get("fingerprint") or None
        if fingerprint is not None and stored is not None and stored != fingerprint:
            raise EstimatorMismatchError(
                f"estimator file {path} was built for other weights (fingerprint {stored}, this "
                f"model has {fingerprint}, model name in the file: {metadata.get('model') or '?'}); "
                "rebuild it for this model"
            )
        tensors = load_file(str(path), device=str(device))
        factors: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            layer, proj, part = name.split(".")
            if part != "w1":
                continue
            factors[(int(layer), proj)] = (tensor.float(), tensors[f"{layer}.{proj}.w2"].float())
        rank = int(metadata.get("rank", 0)) or max(a.shape[1] for a, _ in factors.values())
        return cls(
            factors, metadata.get("kind", "svd"), rank, stored, metadata.get("model") or None
        )

    def check_shapes(self, weights: Mapping[Key, torch.Tensor]) -> None:
        """Raise EstimatorMismatchError unless every factor matches its weight's shape."""
        for key, weight in weights.items():
            if key not in self.factors:
                raise EstimatorMismatchError(
                    f"estimator has no factors for layer {key[0]} {key[1]}"
                )
            a, b = self.factors[key]
            if (a.shape[0], b.shape[1]) != (weight.shape[1], weight.shape[0]):
                raise EstimatorMismatchError(
                    f"estimator factors for layer {key[0]} {key[1]} map {a.shape[0]} -> "
                    f"{b.shape[1]}, but the model's weight is {tuple(weight.shape)} (out, in)"
                )


class EstimatorCache:
    """Estimator files keyed by model fingerprint, kind and rank; stale files are rebuilt.

    A file is reused only if its stored fingerprint equals the model's and it holds every
    (layer, projection) needed; otherwise the missing factors are built and the file rewritten.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        """Files live in `root`, default $SPARSELORA_CACHE/estimators or ~/.cache/sparselora/estimators."""
        default = Path(os.environ.get("SPARSELORA_CACHE", Path.home() / ".cache" / "sparselora"))
        self.root = Path(root) if root is not None else default / "estimators"

    def path(self, fingerprint: str, kind: str, rank: int) -> Path:
        return self.root / f"{fingerprint[:16]}-{kind}-r{rank}.safetensors"

    def load(self, fingerprint: str, kind: str, rank: int, keys: Iterable[Key]) -> Estimator | None:
        """The cached estimator if it exists, matches and covers `keys`; else None."""
        path = self.path(fingerprint, kind, rank)
        if not path.exists():
            return None
        try:
            estimator = Estimator.load(path, fingerprint=fingerprint)
        except EstimatorMismatchError as err:
            logger.warning("ignoring stale estimator cache: %s", err)
            return None
        except Exception as err:  # a truncated or corrupt file is rebuilt, not trusted
            logger.warning("ignoring unreadable estimator cache %s: %s", path, err)
            return None
        if estimator.fingerprint != fingerprint or any(k not in estimator for k in keys):
            return None
        return estimator

    def store(self, estimator: Estimator) -> Path:
        """Save, merged with the factors already cached for the same model, kind and rank."""
        path = self.path(estimator.fingerprint or "unknown", estimator.kind, estimator.rank)
        previous = self.load(estimator.fingerprint, estimator.kind, estimator.rank, ())
        if previous is not None:
            estimator = Estimator(
                {**previous.factors, **estimator.factors},
                estimator.kind,
                estimator.rank,
                estimator.fingerprint,
                estimator.model_name,
            )
        estimator.save(path)
        logger.info("saved estimator (%d factor pairs) to %s", len(estimator.factors), path)
        return path
