"""Neuron partitions of a SwiGLU FFN into equal-size experts.

A partition is a permutation ``perm_I`` of the I neurons: expert e owns neurons
``perm_I[e·H:(e+1)·H]``. Applying it to the weights bakes it in, so a saved model needs no
permutation.

Shape legend: I FFN neurons (intermediate size), D hidden size, S tokens, K clusters (experts),
H neurons per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contiguous_partition(intermediate_size: int) -> torch.Tensor:
    """(I,) the identity permutation: expert e owns neurons [e·H, (e+1)·H)."""
    return torch.arange(intermediate_size)


def neuron_activations(
    x_SD: torch.Tensor, gate_ID: torch.Tensor, up_ID: torch.Tensor
) -> torch.Tensor:
    """(S, I) SwiGLU intermediate activations ``silu(gate x) · up x`` (``nn.Linear`` weight
    layout: (I, D))."""
    return F.silu(x_SD @ gate_ID.T) * (x_SD @ up_ID.T)


def balanced_kmeans(
    features_IF: torch.Tensor, num_clusters: int, iters: int, seed: int = 0
) -> torch.Tensor:
    """Balanced spherical k-means: every cluster holds exactly I / K items.

    scikit-learn's ``KMeans`` (k-means++ seeding from ``seed``, at most ``iters`` iterations)
    finds K centroids of the L2-normalised features; then scipy's ``linear_sum_assignment``
    places every item in one of the K·(I/K) slots (I/K per centroid) maximising the total cosine
    similarity to its slot's centroid: the optimal balanced assignment to those centroids.
    KMeans runs on one thread (its OpenMP pool next to torch's is 20-30x slower on a small
    shared CPU).

    Args:
        features_IF: (I, F) one feature row per item.
        num_clusters: K, dividing I.
        iters: KMeans iterations (``max_iter``).
        seed: KMeans ``random_state``.

    Returns:
        (I,) int64 cluster labels.

    Raises:
        ImportError: scikit-learn or scipy is missing, naming how to install them.
    """
    try:
        from scipy.optimize import linear_sum_assignment
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError as error:
        raise ImportError(
            f"the clustered partition needs scikit-learn and scipy ({error}): "
            "pip install 'xmoe[hf]' (or scikit-learn scipy)"
        ) from None
    num_items = features_IF.shape[0]
    if num_items % num_clusters:
        raise ValueError(f"balanced_kmeans: {num_clusters} clusters do not divide {num_items}")
    size = num_items // num_clusters
    if num_clusters == 1:
        return torch.zeros(num_items, dtype=torch.int64)
    if size == 1:  # every item its own expert: the balanced partition is the identity
        return torch.arange(num_items)
    feats = F.normalize(features_IF.detach().to(torch.float64).cpu(), dim=1)
    kmeans = KMeans(n_clusters=num_clusters, n_init=1, max_iter=iters, random_state=seed)
    with threadpool_limits(limits=1):
        kmeans.fit(feats.to(torch.float32).numpy())  # float32: half the time, same clusters
    centroids_KF = F.normalize(torch.from_numpy(kmeans.cluster_centers_).to(feats.dtype), dim=1)
    # slot j belongs to cluster j // size; cost = -cosine similarity to that cluster's centroid
    cost_IJ = -(feats @ centroids_KF.T).repeat_interleave(size, dim=1)
    rows, slots = linear_sum_assignment(cost_IJ.numpy())
    labels_I = torch.empty(num_items, dtype=torch.int64)
    labels_I[torch.from_numpy(rows)] = torch.from_numpy(slots // size)
    return labels_I


def clustered_partition(
    x_SD: torch.Tensor,
    gate_ID: torch.Tensor,
    up_ID: torch.Tensor,
    expert_size: int,
    iters: int = 25,
    seed: int = 0,
) -> torch.Tensor:
    """Group co-activated neurons: balanced k-means on activation-magnitude patterns.

    Neuron n's feature is ``|h_n|`` over the calibration tokens (its activation pattern);
    cosine similarity between two patterns is high when the neurons fire strongly on the same
    tokens, which is what lets a token's useful neurons sit in few experts (MoEfication's
    co-activation graph, as clustering instead of METIS).

    Args:
        x_SD: (S, D) calibration MLP inputs.
        gate_ID, up_ID: (I, D) the FFN's gate and up weights.
        expert_size: H, dividing I.

    Returns:
        (I,) permutation: neurons of cluster 0, then cluster 1, ... (ascending ids within one).
    """
    pattern_SI = neuron_activations(x_SD, gate_ID, up_ID).abs()
    num_clusters = gate_ID.shape[0] // expert_size
    labels_I = balanced_kmeans(pattern_SI.T, num_clusters, iters, seed)
    return torch.sort(labels_I, stable=True).indices


def captured_mass(pattern_SI: torch.Tensor, perm_I: torch.Tensor, expert_size: int, k: int):
    """Mean over tokens of the share of ``|activation|`` mass held by the token's k best
    experts under a partition: how well it groups co-activated neurons (1 = perfectly).

    Args:
        pattern_SI: (S, I) neuron activations. perm_I: (I,) partition. k: experts kept.

    Returns:
        a float in (0, 1].
    """
    mass_SEH = pattern_SI.abs()[:, perm_I].view(pattern_SI.shape[0], -1, expert_size)
    mass_SE = mass_SEH.sum(dim=-1)
    best_SK = mass_SE.topk(k, dim=1).values
    return float((best_SK.sum(1) / mass_SE.sum(1).clamp_min(1e-30)).mean())
