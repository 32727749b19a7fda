"""The SVD sparsity estimator: rank-r factors A (in, r), B (r, out) with x A B ≈ x W^T.

Two kinds, both training-free:
- `svd` (the paper): thin SVD of W^T, A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T. Best for inputs
  spread evenly over all directions.
- `whitened_svd`: the rank-r minimiser of E||x (W^T - A B)||^2 over real inputs x. With the
  input covariance C = L L^T (Cholesky), that is A B = L^-T [L^T W^T]_r; it spends the rank on
  the directions the inputs actually occupy.

Factors are float32 whatever the model dtype (a low-precision estimator makes scores tie).
Files are safetensors with keys "{layer}.{proj}.w1" (in, r) and "{layer}.{proj}.w2" (r, out),
the layout the paper's authors publish, plus metadata naming the model fingerprint, a checksum
of the factors and, for `whitened_svd`, a fingerprint of the calibration tokens. A file that
cannot be trusted (unreadable, misnamed, mismatched, non-finite, failing its checksum) raises
`EstimatorFileError` naming it; the cache logs it and rebuilds instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

FORMAT = "sparselora-estimator"
Key = tuple[int, str]  # (layer index, projection name)
FFN_ESTIMATED = ("gate_proj", "up_proj")  # down_proj reuses their channels
ATTN_ESTIMATED = ("q_proj", "k_proj", "v_proj")  # o_proj reuses v_proj's channels
ESTIMATED = FFN_ESTIMATED + ATTN_ESTIMATED
KINDS = ("svd", "whitened_svd")
_TENSOR_NAME = re.compile(r"(\d+)\.([A-Za-z_]\w*)\.(w1|w2)")


class EstimatorMismatchError(ValueError):
    """An estimator file does not belong to this model (fingerprint, shapes or kind differ)."""


class EstimatorFileError(ValueError):
    """An estimator file cannot be trusted: not readable as safetensors, tensors not named
    "{layer}.{proj}.w1" / ".w2" in pairs of matching rank, bad metadata, non-finite factors, or
    factors that fail the checksum stored at save."""


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


class CalibrationDigest:
    """The fingerprint of what a whitened estimator is calibrated on, built forward by forward.

    Hashes the damping, then for each calibration forward in order its (B, L) shape, its
    attention mask and the ids of its real tokens (int64). Two calibrations get the same
    fingerprint exactly when they ran the same token batches, padded the same way.
    """

    def __init__(self, damping: float) -> None:
        self._digest = hashlib.sha256(f"damping={damping!r}".encode())

    def update(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """tokens: (B, L) input ids or (B, L, H) input embeddings; attention_mask: (B, L), 1 at
        real tokens, or None (every token real)."""
        shape = tuple(tokens.shape[:2])
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            real = attention_mask.detach().to(device="cpu", dtype=torch.bool)
        else:
            real = torch.ones(shape, dtype=torch.bool)
        tokens = tokens.detach().cpu()
        tokens = tokens.long() if not tokens.is_floating_point() else tokens.float()
        self._digest.update(repr(shape).encode())
        self._digest.update(real.numpy().tobytes())
        self._digest.update(tokens[real].contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        """The fingerprint of everything seen so far (32 hex characters)."""
        return self._digest.hexdigest()[:32]


def calibration_fingerprint(batches: Iterable[Mapping[str, torch.Tensor]], damping: float) -> str:
    """The `CalibrationDigest` of calibration `batches` (dicts of model inputs), as
    `SparseLoRA.calibrate(batches)` computes it while running them."""
    digest = CalibrationDigest(damping)
    for batch in batches:
        tokens = batch.get("input_ids")
        digest.update(
            batch["inputs_embeds"] if tokens is None else tokens, batch.get("attention_mask")
        )
    return digest.hexdigest()


def factors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a file's tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    """Low-rank factors for a set of (layer, projection) pairs of one model.

    factors: {(layer, projection): (A (in, r), B (r, out))}, float32 and finite.
    fingerprint: of the weights they were built from (`weights_fingerprint`), or None if unknown.
    calibration: for `whitened_svd`, the `CalibrationDigest` of the calibration forwards; None
      for `svd` (weights only) or when unknown (files written before it was recorded).
    """

    def __init__(
        self,
        factors: dict[Key, tuple[torch.Tensor, torch.Tensor]],
        kind: str,
        rank: int,
        fingerprint: str | None,
        model_name: str | None = None,
        calibration: str | None = None,
    ) -> None:
        self.factors = factors
        self.kind = kind
        self.rank = rank
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.calibration = calibration

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
        calibration: str | None = None,
    ) -> Estimator:
        """Factor every weight. whitened_svd needs `covariances[(layer, proj)]` for each key.

        Raises ValueError if a weight or covariance holds NaN or inf (the factors would be
        non-finite and select an arbitrary fixed block of channels).
        """
        if kind == "whitened_svd" and covariances is None:
            raise ValueError("estimator 'whitened_svd' needs input covariances (calibration data)")
        factors = {}
        for key in tqdm(sorted(weights), desc="estimator", delay=2.0, leave=False):
            weight = weights[key]  # one at a time: a Mapping may build them lazily
            _check_finite(weight, "weight", key)
            with torch.no_grad():
                full_rank = min(rank, *weight.shape)  # a thin matrix caps the rank
                if kind == "svd":
                    factors[key] = svd_factors(weight, full_rank)
                else:
                    _check_finite(covariances[key], "calibration covariance", key)
                    factors[key] = whitened_svd_factors(
                        weight, covariances[key], full_rank, damping
                    )
            for factor in factors[key]:
                _check_finite(factor, "estimator factors", key)
        return cls(
            factors,
            kind,
            rank,
            fingerprint or weights_fingerprint(weights),
            model_name,
            calibration,
        )

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the factors atomically as safetensors, with metadata and a factors checksum.

        Raises OSError (or SafetensorError) if the file cannot be written.
        """
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
            "calibration": self.calibration or "",
            "checksum": factors_checksum(tensors),
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
        kind 'svd'; their shapes are checked against the model when applied. Files written
        before checksums were stored load without that check.
        Raises EstimatorFileError (naming the file and the problem) for a file that cannot be
        trusted, EstimatorMismatchError for one built for other weights.
        """
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            reason = " ".join(str(err).split())
            raise EstimatorFileError(
                f"estimator file {path} is not a readable safetensors file ({reason})"
            ) from err
        kind, rank = _checked_metadata(path, metadata)
        stored = metadata.get("fingerprint") or None
        if fingerprint is not None and stored is not None and stored != fingerprint:
            raise EstimatorMismatchError(
                f"estimator file {path} was built for other weights (fingerprint {stored}, this "
                f"model has {fingerprint}, model name in the file: {metadata.get('model') or '?'}); "
                "rebuild it for this model"
            )
        factors = _paired_factors(path, tensors)
        checksum = metadata.get("checksum")
        if checksum and factors_checksum(tensors) != checksum:
            raise EstimatorFileError(
                f"estimator file {path} fails its checksum: the stored factors changed after "
                "it was written (a damaged copy); rebuild it"
            )
        if not checksum and metadata.get("format") == FORMAT:
            logger.info("estimator file %s has no checksum (an older version wrote it)", path)
        for (layer, proj), pair in factors.items():
            if not all(bool(f.isfinite().all()) for f in pair):
                raise EstimatorFileError(
                    f"estimator file {path}: the factors of layer {layer} {proj} are not "
                    "finite (NaN or inf); rebuild it"
                )
        factors = {k: (a.to(device), b.to(device)) for k, (a, b) in factors.items()}
        rank = rank or max(a.shape[1] for a, _ in factors.values())
        calibration = metadata.get("calibration") or None
        return cls(factors, kind, rank, stored, metadata.get("model") or None, calibration)

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


def _check_finite(tensor: torch.Tensor, what: str, key: Key) -> None:
    """ValueError unless `tensor` is finite: NaN or inf would select a fixed block of channels."""
    if not bool(tensor.isfinite().all()):
        raise ValueError(f"{what} of layer {key[0]} {key[1]} is not finite (NaN or inf)")


def _checked_metadata(path: str | os.PathLike, metadata: Mapping[str, str]) -> tuple[str, int]:
    """(kind, rank) from a file's metadata; rank 0 when the file does not say."""
    kind = metadata.get("kind", "svd")
    if kind not in KINDS:
        raise EstimatorFileError(
            f"estimator file {path}: metadata kind {kind!r} is not one of {list(KINDS)}"
        )
    rank = metadata.get("rank", "0")
    if not rank.isdigit() or (int(rank) < 1 and "rank" in metadata):
        raise EstimatorFileError(
            f"estimator file {path}: metadata rank {rank!r} is not a positive integer"
        )
    return kind, int(rank)


def _paired_factors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]
) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, proj): (A (in, r), B (r, out))} float32 from tensors named "{layer}.{proj}.w1"
    and ".w2"; EstimatorFileError for any other name, a missing half or mismatched shapes."""
    parts: dict[Key, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise EstimatorFileError(
                f"estimator file {path}: tensor {name!r} is not named '{{layer}}.{{proj}}.w1' or "
                "'{layer}.{proj}.w2' (is it a model checkpoint rather than an estimator?)"
            )
        layer, proj, part = match.groups()
        parts.setdefault((int(layer), proj), {})[part] = tensor
    if not parts:
        raise EstimatorFileError(f"estimator file {path} holds no factors")
    factors = {}
    for (layer, proj), pair in sorted(parts.items()):
        missing = [p for p in ("w1", "w2") if p not in pair]
        if missing:
            raise EstimatorFileError(
                f"estimator file {path}: {layer}.{proj}.{missing[0]} is missing (every "
                "projection needs both w1 (in, r) and w2 (r, out))"
            )
        a, b = pair["w1"], pair["w2"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise EstimatorFileError(
                f"estimator file {path}: {layer}.{proj}.w1 {tuple(a.shape)} and .w2 "
                f"{tuple(b.shape)} are not factors (in, r) and (r, out) of one rank r"
            )
        factors[(layer, proj)] = (a.float(), b.float())
    return factors


class EstimatorCache:
    """Estimator files keyed by model fingerprint, kind, rank and (whitened) calibration data.

    A file is reused only if its stored fingerprint (and calibration fingerprint) equal the
    requested ones and it holds every (layer, projection) needed; otherwise the missing
    factors are built and the file rewritten. The cache never stops a run: a damaged file is
    logged and rebuilt, a file that cannot be written is logged and the estimator stays in
    memory only.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        """Files live in `root`, default $SPARSELORA_CACHE/estimators or ~/.cache/sparselora/estimators."""
        default = Path(os.environ.get("SPARSELORA_CACHE", Path.home() / ".cache" / "sparselora"))
        self.root = Path(root) if root is not None else default / "estimators"

    def path(self, fingerprint: str, kind: str, rank: int, calibration: str | None = None) -> Path:
        """The file for these weights, kind and rank; with `calibration` (whitened), for that
        calibration data: `{fingerprint[:16]}-{kind}-r{rank}[-c{calibration[:16]}].safetensors`."""
        suffix = f"-c{calibration[:16]}" if calibration else ""
        return self.root / f"{fingerprint[:16]}-{kind}-r{rank}{suffix}.safetensors"

    def load(
        self,
        fingerprint: str,
        kind: str,
        rank: int,
        keys: Iterable[Key],
        calibration: str | None = None,
    ) -> Estimator | None:
        """The cached estimator if it exists, matches (weights, and `calibration` when given)
        and covers `keys`; else None."""
        path = self.path(fingerprint, kind, rank, calibration)
        return self._read(path, fingerprint, calibration, keys)

    def latest(
        self, fingerprint: str, kind: str, rank: int, keys: Iterable[Key]
    ) -> Estimator | None:
        """The most recently written estimator for these weights, kind and rank that records
        its calibration data (whatever that was) and covers `keys`; else None."""
        pattern = f"{fingerprint[:16]}-{kind}-r{rank}-c*.safetensors"
        try:
            paths = sorted(self.root.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return None
        keys = list(keys)
        for path in paths:
            estimator = self._read(path, fingerprint, None, keys)
            if estimator is not None and estimator.calibration:
                return estimator
        return None

    def _read(
        self, path: Path, fingerprint: str | None, calibration: str | None, keys: Iterable[Key]
    ) -> Estimator | None:
        try:
            if not path.is_file():
                return None
            estimator = Estimator.load(path, fingerprint=fingerprint)
        except EstimatorMismatchError as err:
            logger.warning("ignoring stale estimator cache: %s", err)
            return None
        except (EstimatorFileError, OSError) as err:  # damaged: rebuilt, never trusted
            logger.warning("ignoring damaged estimator cache file (it will be rebuilt): %s", err)
            return None
        if (
            estimator.fingerprint != fingerprint
            or (calibration is not None and estimator.calibration != calibration)
            or any(k not in estimator for k in keys)
        ):
            return None
        return estimator

    def store(self, estimator: Estimator) -> Path | None:
        """Save, merged with the factors already cached for the same model, kind, rank and
        calibration. Returns the file, or None (with a warning naming it and why) if it cannot
        be written; the estimator stays usable in memory either way."""
        path = self.path(
            estimator.fingerprint or "unknown",
            estimator.kind,
            estimator.rank,
            estimator.calibration,
        )
        previous = self._read(path, estimator.fingerprint, estimator.calibration, ())
        if previous is not None:
            estimator = Estimator(
                {**previous.factors, **estimator.factors},
                estimator.kind,
                estimator.rank,
                estimator.fingerprint,
                estimator.model_name,
                estimator.calibration,
            )
        try:
            estimator.save(path)
        except (OSError, SafetensorError) as err:
            logger.warning(
                "could not write estimator cache file %s (%s); going on with the estimator in "
                "memory only",
                path,
                err,
            )
            return None
        logger.info("saved estimator (%d factor pairs) to %s", len(estimator.factors), path)
        return path
