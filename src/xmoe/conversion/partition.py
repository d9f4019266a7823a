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


def balanced_assign(similarity_IK: torch.Tensor, size: int) -> torch.Tensor:
    """Assign every item to a cluster, exactly ``size`` items per cluster, greedily by
    similarity.

    Each round, every unassigned item proposes to its most similar cluster that still has room;
    each cluster accepts its most similar proposers up to its remaining room (ties toward the
    lower item id). At least one item is placed per round, so it ends within I rounds (in
    practice a few).

    Args:
        similarity_IK: (I, K) with I = K · size.
        size: items per cluster.

    Returns:
        (I,) int64 cluster of each item.
    """
    num_items, num_clusters = similarity_IK.shape
    if num_items != num_clusters * size:
        raise ValueError(f"balanced_assign: {num_items} items do not fill {num_clusters}×{size}")
    labels_I = torch.full((num_items,), -1, dtype=torch.int64)
    room_K = torch.full((num_clusters,), size, dtype=torch.int64)
    sim_IK = similarity_IK.detach().to(torch.float64).cpu()
    while (labels_I < 0).any():
        open_K = room_K > 0
        items = (labels_I < 0).nonzero().squeeze(1)
        masked = sim_IK[items].masked_fill(~open_K, float("-inf"))
        best_sim, best_cluster = masked.max(dim=1)
        # group proposals by cluster, most similar first: a stable sort by similarity, then
        # a stable sort by cluster
        by_sim = torch.sort(best_sim, descending=True, stable=True).indices
        order = by_sim[torch.sort(best_cluster[by_sim], stable=True).indices]
        clusters = best_cluster[order]
        counts_K = torch.bincount(clusters, minlength=num_clusters)
        starts_K = counts_K.cumsum(0) - counts_K
        rank = torch.arange(order.numel()) - starts_K[clusters]
        accept = rank < room_K[clusters]
        labels_I[items[order[accept]]] = clusters[accept]
        room_K -= torch.bincount(clusters[accept], minlength=num_clusters)
    return labels_I


def balanced_kmeans(
    features_IF: torch.Tensor, num_clusters: int, iters: int, seed: int = 0
) -> torch.Tensor:
    """Spherical k-means with every cluster holding exactly I / K items.

    Features are L2-normalised; centroids start at K items picked farthest-first (a first item
    drawn with ``seed``, then each next the item least similar to all picked so far, which
    seeds well-separated groups apart); each iteration assigns by cosine similarity through
    :func:`balanced_assign`, then moves each centroid to its members' normalised mean. Stops
    early when the labels stop changing.

    Args:
        features_IF: (I, F) one feature row per item.
        num_clusters: K, dividing I.
        iters: at most this many assignment steps.

    Returns:
        (I,) int64 cluster labels.
    """
    num_items = features_IF.shape[0]
    size = num_items // num_clusters
    feats = F.normalize(features_IF.detach().to(torch.float64).cpu(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    picked = [int(torch.randint(num_items, (1,), generator=generator))]
    closest_I = feats @ feats[picked[0]]
    for _ in range(num_clusters - 1):
        closest_I[picked] = float("inf")  # never pick an item twice
        picked.append(int(closest_I.argmin()))
        closest_I = torch.maximum(closest_I, feats @ feats[picked[-1]])
    centroids_KF = feats[picked]
    labels_I = torch.full((num_items,), -1, dtype=torch.int64)
    for _ in range(iters):
        new_labels_I = balanced_assign(feats @ centroids_KF.T, size)
        if torch.equal(new_labels_I, labels_I):
            break
        labels_I = new_labels_I
        sums_KF = torch.zeros_like(centroids_KF).index_add_(0, labels_I, feats)
        centroids_KF = F.normalize(sums_KF, dim=1)
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
