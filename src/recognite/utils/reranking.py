"""Re-ranking settings: what a bundle stores and ``recognize`` / ``evaluate`` apply.

The algorithms live in :mod:`recognite.gallery.rerank` (query expansion) and
:mod:`recognite.gallery.k_reciprocal`; these are only their settings, so that a bundle can hold
them without depending on the gallery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recognite.utils.validate import check_int, check_number

__all__ = ["KReciprocal", "Reranking", "choose_reranking"]


@dataclass(frozen=True)
class KReciprocal:
    """Settings of k-reciprocal re-ranking (Zhong et al.'s defaults).

    Attributes:
        k1: neighbours of the reciprocal sets (``k1 + 1`` items, the item itself included).
        k2: neighbours averaged in the local query expansion of the sets (the item included).
        lambda_value: weight of the original distance in the final one (0 = Jaccard only;
            1 = no re-ranking).
        top_n: candidates re-ranked per query (the rest keep their order below them).
    """

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    top_n: int = 100

    def __post_init__(self) -> None:
        check_int(self.k1, "k1", minimum=1)
        check_int(self.k2, "k2", minimum=1)
        check_number(self.lambda_value, "lambda_value", minimum=0.0, maximum=1.0)
        check_int(self.top_n, "top_n", minimum=1)

    def to_dict(self) -> dict[str, Any]:
        return {"k1": self.k1, "k2": self.k2, "lambda_value": self.lambda_value, "top_n": self.top_n}

    @classmethod
    def from_dict(cls, data: Any, source: str = "k_reciprocal") -> KReciprocal:
        allowed = {"k1", "k2", "lambda_value", "top_n"}
        if not isinstance(data, dict) or set(data) - allowed:
            raise ValueError(f"{source} must be a dict with keys {sorted(allowed)}; got {data!r}")
        return cls(**data)


@dataclass(frozen=True)
class Reranking:
    """Re-ranking applied by ``recognize`` and ``evaluate`` (episodes are not re-ranked).

    Attributes:
        query_expansion: alpha query expansion with this many gallery neighbours (0 = off).
        qe_alpha: its weight exponent.
        k_reciprocal: k-reciprocal re-ranking settings, or None (off).
    """

    query_expansion: int = 0
    qe_alpha: float = 3.0
    k_reciprocal: KReciprocal | None = None

    def __post_init__(self) -> None:
        check_int(self.query_expansion, "query_expansion", minimum=0)
        check_number(self.qe_alpha, "qe_alpha", minimum=0.0)
        if self.k_reciprocal is not None and not isinstance(self.k_reciprocal, KReciprocal):
            raise TypeError(f"k_reciprocal must be a KReciprocal or None, got {type(self.k_reciprocal).__name__}")

    @property
    def active(self) -> bool:
        """Whether anything is re-ranked."""
        return bool(self.query_expansion) or self.k_reciprocal is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.query_expansion:
            out["query_expansion"] = {"k": self.query_expansion, "alpha": self.qe_alpha}
        if self.k_reciprocal is not None:
            out["k_reciprocal"] = self.k_reciprocal.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "reranking") -> Reranking:
        if not isinstance(data, dict) or set(data) - {"query_expansion", "k_reciprocal"}:
            raise ValueError(f"{source} must be a dict with keys query_expansion, k_reciprocal; got {data!r}")
        qe = data.get("query_expansion") or {"k": 0, "alpha": 3.0}
        if not isinstance(qe, dict) or set(qe) != {"k", "alpha"}:
            raise ValueError(f"{source}.query_expansion must be a dict with keys k, alpha; got {qe!r}")
        kr = data.get("k_reciprocal")
        return cls(qe["k"], qe["alpha"], None if kr is None else KReciprocal.from_dict(kr, f"{source}.k_reciprocal"))


def choose_reranking(stored: Reranking | None, use_stored: bool, query_expansion: int = 0, qe_alpha: float = 3.0,
                     k_reciprocal: KReciprocal | None = None) -> Reranking:
    """The re-ranking of one call: the one it asks for, when it asks for any; otherwise the
    bundle's (``stored``) unless ``use_stored`` is False; otherwise none."""
    given = Reranking(query_expansion, qe_alpha, k_reciprocal)
    if given.active or not use_stored or stored is None:
        return given
    return stored
