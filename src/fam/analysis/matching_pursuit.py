"""Matching pursuit over the LLM's input embeddings: the multi-semantic hypothesis (method.md §5).

The paper (arXiv 2505.17316) hypothesises that a projected patch ``v`` is a sparse linear
combination of word embeddings, one per meaning in the patch ("hand" + "phone" +
"holding"). Greedy matching pursuit reads these words off:

    r_0 = v
    for j = 1..K:   a_j = argmax_a <r_{j-1}, â>        (â: dictionary atom, unit norm)
                    c_j = <r_{j-1}, â_j>
                    r_j = r_{j-1} − c_j â_j
    explained energy after j steps: 1 − ‖r_j‖² / ‖v‖²

**[choice]** Atom selection maximises the *signed* correlation ``<r, â>`` by default
(``selection="positive"``): the paper reads atoms as the words a patch *is*, i.e. positive
similarity. ``selection="abs"`` is classical MP (max ``|<r, â>|``), which may pick
anti-aligned words with negative coefficients. Either way the residual energy is
non-increasing, because subtracting a projection never adds energy. Atoms may repeat
(plain MP, not orthogonal MP).

The dictionary is large (V ≈ 150K for Qwen2, 32K for Vicuna) so the (M, V) scores are
computed in chunks of the vocabulary, keeping a running arg-max; atoms are normalised
chunk by chunk, never copying the whole matrix.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)


@dataclass
class MPResult:
    """Output of :func:`matching_pursuit`.

    Attributes:
        atoms: ``(M, k)`` long, dictionary row picked at each step.
        coefs: ``(M, k)`` coefficient of each picked atom (w.r.t. the *normalised* atom when
            ``normalize_dict``, else w.r.t. the raw row).
        explained_energy: ``(M, k+1)``, ``1 − ‖r_j‖²/‖v‖²`` for j = 0..k (column 0 is 0);
            0 for an all-zero ``v``.
        residual: ``(M, d)`` final residual ``r_k``.
    """

    atoms: torch.Tensor
    coefs: torch.Tensor
    explained_energy: torch.Tensor
    residual: torch.Tensor


def _atom_norms(dictionary: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    out = []
    for s in range(0, dictionary.shape[0], chunk_size):
        out.append(dictionary[s:s + chunk_size].to(dtype).norm(dim=1))
    return torch.cat(out)


@torch.no_grad()
def matching_pursuit(v: torch.Tensor, dictionary: torch.Tensor, k_max: int = 10,
                     normalize_dict: bool = True,
                     selection: Literal["positive", "abs"] = "positive",
                     chunk_size: int | None = 32768, allowed: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> MPResult:
    """Greedy matching pursuit of vectors over a dictionary (method.md §5).

    Args:
        v: ``(M, d)`` vectors (projected patches, or region means).
        dictionary: ``(V, d)`` atoms (the LLM's input-embedding matrix); may live on another
            device and dtype, chunks are moved/cast on the fly.
        k_max: number of greedy steps K (5–10 in the paper).
        normalize_dict: use unit-norm atoms (method.md §5: "the L2-normalised LLM input
            embeddings").
            If False, raw rows: selection by raw inner product, coefficient
            ``<r, a>/‖a‖²`` (still an exact projection).
        selection: "positive" (max ``<r, a>``, default) or "abs" (max ``|<r, a>|``).
        chunk_size: vocabulary rows per chunk of the (M, V) score matrix; None = all at once.
        allowed: ``(V,)`` bool, atoms that may be picked (e.g. exclude special tokens);
            zero-norm rows are never picked.
        dtype: compute dtype (float32; float64 for exactness tests).

    Returns:
        :class:`MPResult`.
    """
    if selection not in ("positive", "abs"):
        raise ValueError(f"selection={selection!r}: expected 'positive' or 'abs'")
    if v.dim() != 2 or dictionary.dim() != 2 or v.shape[1] != dictionary.shape[1]:
        raise ValueError(f"v {tuple(v.shape)} must be (M, d) and dictionary "
                         f"{tuple(dictionary.shape)} (V, d) with the same d")
    dev = v.device
    nv = dictionary.shape[0]
    chunk = nv if chunk_size is None else max(1, int(chunk_size))
    r = v.detach().to(dtype).clone()                                  # (M, d) residual
    m = r.shape[0]
    e0 = (r * r).sum(1)                                               # (M,) ‖v‖²
    norms = _atom_norms(dictionary, chunk, dtype).to(dev)              # (V,)
    ok = norms > 0
    if allowed is not None:
        ok = ok & allowed.to(dev).bool()
    if not bool(ok.any()):
        raise ValueError("matching_pursuit: no usable atom (all zero-norm or not allowed)")
    # scale applied to raw inner products: 1/‖a‖ for unit atoms, 1 for raw rows
    scale = torch.where(ok, 1.0 / norms.clamp_min(torch.finfo(dtype).tiny),
                        torch.zeros_like(norms)) if normalize_dict else ok.to(dtype)

    atoms = torch.empty(m, k_max, dtype=torch.long, device=dev)
    coefs = torch.empty(m, k_max, dtype=dtype, device=dev)
    energy = torch.zeros(m, k_max + 1, dtype=dtype, device=dev)
    for j in range(k_max):
        best = torch.full((m,), -float("inf"), dtype=dtype, device=dev)
        best_idx = torch.zeros(m, dtype=torch.long, device=dev)
        for s in range(0, nv, chunk):
            dch = dictionary[s:s + chunk].to(device=dev, dtype=dtype)  # (c, d)
            sc = (r @ dch.T) * scale[s:s + chunk]                      # (M, c)
            key = sc.abs() if selection == "abs" else sc
            key = key.masked_fill(~ok[s:s + chunk], -float("inf"))
            val, arg = key.max(dim=1)
            better = val > best  # strict: ties keep the lowest index, as an unchunked argmax
            best = torch.where(better, val, best)
            best_idx = torch.where(better, arg + s, best_idx)
        a = dictionary[best_idx].to(device=dev, dtype=dtype)            # (M, d) raw atoms
        a_sq = (a * a).sum(1)
        ip = (r * a).sum(1)                                             # <r, a>
        if normalize_dict:
            c = ip / a_sq.sqrt()                                        # <r, â>
            r = r - (ip / a_sq).unsqueeze(1) * a                        # r − <r, â> â
        else:
            c = ip / a_sq
            r = r - c.unsqueeze(1) * a
        atoms[:, j] = best_idx
        coefs[:, j] = c
        energy[:, j + 1] = torch.where(e0 > 0, 1 - (r * r).sum(1) / e0.clamp_min(
            torch.finfo(dtype).tiny), torch.zeros_like(e0))
    return MPResult(atoms=atoms, coefs=coefs, explained_energy=energy, residual=r)


def label_recovery(atoms: torch.Tensor, label_token_ids: Sequence[Sequence[int]], k: int,
                   require: Literal["any", "all"] = "any") -> float:
    """Fraction of regions whose label tokens are among their first ``k`` MP atoms.

    Args:
        atoms: ``(R, k_max)`` atoms of each region's vector (e.g. the MP of the region's mean
            projected patch), in pick order.
        label_token_ids: R lists, the label's token ids.
        k: how many atoms count (≤ k_max).
        require: "any" (default: at least one label token recovered; a multi-token label
            like "fire hydrant" is found if any piece is) or "all".

    Returns:
        Fraction in ``[0, 1]`` over regions with a non-empty label (NaN if none).
    """
    if len(label_token_ids) != atoms.shape[0]:
        raise ValueError(f"{len(label_token_ids)} labels for {atoms.shape[0]} rows of atoms")
    if not 0 < k <= atoms.shape[1]:
        raise ValueError(f"k={k} must be in [1, {atoms.shape[1]}] (the MP steps run)")
    if require not in ("any", "all"):
        raise ValueError(f"require={require!r}: expected 'any' or 'all'")
    top = atoms[:, :k].tolist()
    hits, n = 0, 0
    for picked, ids in zip(top, label_token_ids):
        ids = set(int(i) for i in ids)
        if not ids:
            continue
        n += 1
        found = ids & set(picked)
        hits += bool(found) if require == "any" else found == ids
    return hits / n if n else float("nan")
